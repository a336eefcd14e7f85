//! The image a job runs in: `container:` when given, else the first
//! `runs-on` label that [`RunnerImages`] maps (act's `-P label=image`).

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::env::env_map;
use super::job::JobBuilder;
use super::{Contexts, Workflow};
use crate::error::Result;
use crate::yaml::{join, key, scalars};

/// `runs-on` label to image, like act's `-P label=image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerImages(pub BTreeMap<String, String>);

impl Default for RunnerImages {
    /// act's "medium" images for the Ubuntu labels.
    fn default() -> Self {
        let pairs = [
            ("ubuntu-latest", "catthehacker/ubuntu:act-latest"),
            ("ubuntu-24.04", "catthehacker/ubuntu:act-24.04"),
            ("ubuntu-22.04", "catthehacker/ubuntu:act-22.04"),
            ("ubuntu-20.04", "catthehacker/ubuntu:act-20.04"),
        ];
        RunnerImages(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl RunnerImages {
    /// Adds or replaces a mapping (`-P label=image`).
    pub fn set(&mut self, label: impl Into<String>, image: impl Into<String>) {
        self.0.insert(label.into(), image.into());
    }

    /// The image for a job's `runs-on` labels: the first label with one.
    pub fn image_for(&self, labels: &[String]) -> Option<&str> {
        labels
            .iter()
            .find_map(|l| self.0.get(l).map(String::as_str))
    }
}

/// A job's image and the `env` of its container.
type Image = (String, Vec<(String, String)>);

impl JobBuilder<'_> {
    /// The job's image and its container's `env`. `None`, noted in
    /// [`Workflow::unsupported`], when no image is known for `runs-on`.
    pub(super) fn image(
        &self,
        cx: &Contexts,
        name: &str,
        w: &mut Workflow,
    ) -> Result<Option<Image>> {
        let job = self.job;
        let labels = match job.get("runs-on") {
            None => return Err(self.c.err(self.jp, "`runs-on` is missing")),
            Some(Value::Mapping(m)) => m.get("labels").and_then(scalars).unwrap_or_default(),
            Some(v) => scalars(v).ok_or_else(|| {
                self.c.err(
                    &self.at(&[key("runs-on")]),
                    "`runs-on` must be a label or a list",
                )
            })?,
        };
        let labels: Vec<String> = labels
            .iter()
            .map(|l| self.sub(l, cx, &self.at(&[key("runs-on")])).map(|(s, _)| s))
            .collect::<Result<_>>()?;
        let mut container_env = Vec::new();
        let image = match job.get("container") {
            Some(Value::String(s)) => Some(self.sub(s, cx, &self.at(&[key("container")]))?.0),
            Some(Value::Mapping(m)) => {
                let p = self.at(&[key("container")]);
                let img = m
                    .get("image")
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.c.err(&p, "`container` needs an `image`"))?;
                container_env = env_map(
                    m.get("env"),
                    &join(&p, &[key("env")]),
                    self.c,
                    &self.opts.limits,
                )?;
                for k in ["options", "volumes", "ports", "credentials"] {
                    if m.contains_key(k) {
                        w.warnings
                            .push(format!("{name}: `container.{k}` is ignored"));
                    }
                }
                Some(self.sub(img, cx, &p)?.0)
            }
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(self.c.err(
                    &self.at(&[key("container")]),
                    "`container` must be an image or mapping",
                ))
            }
        };
        let image = match image.filter(|i| !i.is_empty()) {
            Some(i) => i,
            None => match self.opts.runner_images.image_for(&labels) {
                Some(i) => i.to_string(),
                None => {
                    w.unsupported.push(format!(
                        "jobs.{} ({name}): no image for runs-on `{}` (map one with -P label=image)",
                        self.id,
                        labels.join(", ")
                    ));
                    return Ok(None);
                }
            },
        };
        Ok(Some((image, container_env)))
    }
}
