//! A job's `services:` (a mapping of labels to an image or to `image`,
//! `env`, ...): each label is the service's host name, as it is for a job
//! in a container on GitHub; the service also answers at `localhost`. The
//! container options GitHub passes to Docker (`ports`, `options`,
//! `volumes`, `credentials`) are not used: a service listens on its own
//! ports in the job's VM (a `ports: [8080:80]` mapping does not apply).

use serde_yaml::Value;

use super::env::env_map;
use super::job::JobBuilder;
use super::{Contexts, Workflow};
use crate::error::Result;
use crate::services::{check_count, service};
use crate::spec::{ServiceSpec, Variable};
use crate::yaml::{join, key};

impl JobBuilder<'_> {
    /// The job's services, checked; one with an empty `image` (GitHub's
    /// way to leave it out, e.g. by a matrix value) is skipped.
    pub(super) fn services(
        &self,
        cx: &Contexts,
        name: &str,
        w: &mut Workflow,
    ) -> Result<Vec<ServiceSpec>> {
        let p = self.at(&[key("services")]);
        let map = match self.job.get("services") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Mapping(m)) => m,
            Some(_) => return Err(self.c.err(&p, "`services` must map labels to services")),
        };
        check_count(map.len()).map_err(|e| self.c.err(&p, e.to_string()))?;
        let mut out = Vec::new();
        for (label, svc) in map {
            let label = label
                .as_str()
                .ok_or_else(|| self.c.err(&p, "a service label must be a string"))?;
            let sp = join(&p, &[key(label)]);
            let (image, env) = match svc {
                Value::String(s) => (self.sub(s, cx, &sp)?.0, Vec::new()),
                Value::Mapping(m) => {
                    let image = m
                        .get("image")
                        .and_then(Value::as_str)
                        .ok_or_else(|| self.c.err(&sp, "a service needs an `image`"))?;
                    let env = env_map(
                        m.get("env"),
                        &join(&sp, &[key("env")]),
                        self.c,
                        &self.opts.limits,
                    )?;
                    for k in ["ports", "options", "volumes", "credentials"] {
                        if m.contains_key(k) {
                            w.warnings
                                .push(format!("{name}: `services.{label}.{k}` is ignored"));
                        }
                    }
                    (self.sub(image, cx, &sp)?.0, env)
                }
                _ => return Err(self.c.err(&sp, "a service must be an image or a mapping")),
            };
            if image.is_empty() {
                continue;
            }
            let vars = env.into_iter().map(|(k, v)| Variable::new(k, v)).collect();
            out.push(
                service(&image, Some(label), None, None, vars)
                    .map_err(|e| self.c.err(&sp, e.to_string()))?,
            );
        }
        Ok(out)
    }
}
