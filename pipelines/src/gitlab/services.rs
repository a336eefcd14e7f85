//! A job's `services:` (inherited from `default:` or the legacy top-level
//! key by the `extends` pass): each a string (the image) or a mapping with
//! `name`, `alias`, `entrypoint`, `command` and `variables`, names and
//! aliases expanded with the job's variables.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::variables::expand_capped;
use super::Parser;
use crate::error::Result;
use crate::services::{check_count, service};
use crate::spec::{ServiceSpec, Variable};
use crate::yaml::{scalar, strings, Seg};

impl Parser<'_> {
    /// The services of `job` (at `path`), checked: at most
    /// [`MAX_SERVICES`](crate::services::MAX_SERVICES), each alias a host
    /// name.
    pub(super) fn services(
        &self,
        job: &Mapping,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<Vec<ServiceSpec>> {
        let list = match job.get("services") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Sequence(s)) => s,
            Some(_) => return Err(self.err(path, "`services` must be a list")),
        };
        check_count(list.len()).map_err(|e| self.err(path, e.to_string()))?;
        let expand = |s: &str, path: &[Seg]| {
            expand_capped(s, vars, self.limits.max_script_bytes)
                .ok_or_else(|| self.limit(path, "a service expands too far".into()))
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let mut at = path.to_vec();
            at.push(Seg::Index(i));
            let svc = match item {
                Value::String(name) => service(&expand(name, &at)?, None, None, None, Vec::new()),
                Value::Mapping(m) => {
                    let name = m
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| self.err(&at, "a service needs a `name` (its image)"))?;
                    let alias = match m.get("alias") {
                        None => None,
                        Some(v) => Some(expand(
                            &scalar(v).ok_or_else(|| self.err(&at, "`alias` must be a string"))?,
                            &at,
                        )?),
                    };
                    let list_of = |k: &str| -> Result<Option<Vec<String>>> {
                        match m.get(k) {
                            None => Ok(None),
                            Some(v) => strings(v).map(Some).ok_or_else(|| {
                                self.err(&at, format!("`{k}` must be a list of strings"))
                            }),
                        }
                    };
                    // `entrypoint: [""]` clears the image's entrypoint.
                    let entrypoint = list_of("entrypoint")?
                        .map(|l| l.into_iter().filter(|s| !s.is_empty()).collect());
                    let command = list_of("command")?;
                    let variables = match m.get("variables") {
                        None | Some(Value::Null) => Vec::new(),
                        Some(Value::Mapping(vm)) => vm
                            .iter()
                            .map(|(k, v)| {
                                let (Some(k), Some(v)) = (k.as_str(), scalar(v)) else {
                                    return Err(self.err(
                                        &at,
                                        "service `variables` must map names to strings",
                                    ));
                                };
                                Ok(Variable::new(k, expand(&v, &at)?))
                            })
                            .collect::<Result<_>>()?,
                        Some(_) => {
                            return Err(self.err(&at, "service `variables` must be a mapping"))
                        }
                    };
                    service(
                        &expand(name, &at)?,
                        alias.as_deref(),
                        entrypoint,
                        command,
                        variables,
                    )
                }
                _ => return Err(self.err(&at, "a service must be a string or a mapping")),
            };
            out.push(svc.map_err(|e| self.err(&at, e.to_string()))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{job, parse_err, parse_ok};

    #[test]
    fn services_forms_and_inheritance() {
        let p = parse_ok(
            "variables: {PG: '15'}\n\
             default:\n  services: ['redis:7']\n\
             plain:\n  script: x\n\
             mapped:\n  script: x\n  services:\n    - postgres:$PG\n    - name: registry.example.com/group/img:1\n      alias: db cache\n      entrypoint: ['']\n      command: [serve, --port, '5432']\n      variables: {A: $PG}\n",
        );
        let plain = job(&p, "plain");
        assert_eq!(plain.services.len(), 1);
        assert_eq!(plain.services[0].image, "redis:7");
        assert_eq!(plain.services[0].aliases, vec!["redis"]);
        let m = job(&p, "mapped");
        assert_eq!(m.services.len(), 2);
        assert_eq!(m.services[0].image, "postgres:15");
        assert_eq!(m.services[0].aliases, vec!["postgres"]);
        let s = &m.services[1];
        assert_eq!(
            s.aliases,
            vec![
                "registry.example.com__group__img",
                "registry.example.com-group-img",
                "db",
                "cache"
            ]
        );
        assert_eq!(s.entrypoint, Some(vec![]));
        assert_eq!(
            s.command,
            Some(vec!["serve".into(), "--port".into(), "5432".into()])
        );
        assert_eq!(s.variables[0].value, "15");
        assert!(
            !p.warnings.iter().any(|w| w.contains("services")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn hostile_services_are_refused() {
        let e = parse_err("j:\n  script: x\n  services: [{name: pg, alias: 'a/b'}]\n");
        assert!(
            e.contains("j.services[0]") && e.contains("is not a host name"),
            "{e}"
        );
        let nine: Vec<String> = (0..9).map(|i| format!("s{i}")).collect();
        let e = parse_err(&format!(
            "j:\n  script: x\n  services: [{}]\n",
            nine.join(", ")
        ));
        assert!(e.contains("at most 8 are supported"), "{e}");
        let e = parse_err("j:\n  script: x\n  services: [{alias: db}]\n");
        assert!(e.contains("needs a `name`"), "{e}");
    }
}
