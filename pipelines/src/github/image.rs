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

    /// The image for a job's `runs-on` labels: the first label mapped,
    /// else the first `ubuntu-*` label's default ([`ubuntu_default`]).
    pub fn image_for(&self, labels: &[String]) -> Option<String> {
        labels
            .iter()
            .find_map(|l| self.0.get(l).cloned())
            .or_else(|| labels.iter().find_map(|l| ubuntu_default(l)))
    }
}

/// act's image for any `ubuntu-*` label GitHub has offered: a versioned
/// label (`ubuntu-18.04`, `ubuntu-24.04-arm`, `ubuntu-22.04-16core`) gets
/// that release's image, any other (`ubuntu-latest-4-cores`) the latest.
pub fn ubuntu_default(label: &str) -> Option<String> {
    let rest = label.strip_prefix("ubuntu-")?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let versioned = version.len() == 5 && version.as_bytes()[2] == b'.';
    Some(if versioned {
        format!("catthehacker/ubuntu:act-{version}")
    } else {
        "catthehacker/ubuntu:act-latest".to_string()
    })
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
        let image = match (&self.opts.image, image.filter(|i| !i.is_empty())) {
            (Some(every), _) => every.clone(),
            (None, Some(i)) => i,
            (None, None) => match self.opts.runner_images.image_for(&labels) {
                Some(i) => i,
                None => {
                    let first = labels.first().map(String::as_str).unwrap_or("LABEL");
                    let first = if first.is_empty() { "LABEL" } else { first };
                    w.unmapped.push((
                        name.to_string(),
                        format!(
                            "runs-on `{}` has no image: pass -P {first}=IMAGE or --image IMAGE",
                            labels.join(", ")
                        ),
                    ));
                    return Ok(None);
                }
            },
        };
        Ok(Some((image, container_env)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{LocalContext, Options};

    #[test]
    fn every_ubuntu_label_has_a_default_image() {
        let m = RunnerImages::default();
        let img = |l: &str| m.image_for(&[l.to_string()]);
        assert_eq!(
            img("ubuntu-18.04").as_deref(),
            Some("catthehacker/ubuntu:act-18.04")
        );
        assert_eq!(
            img("ubuntu-24.04-arm").as_deref(),
            Some("catthehacker/ubuntu:act-24.04")
        );
        assert_eq!(
            img("ubuntu-latest-4-cores").as_deref(),
            Some("catthehacker/ubuntu:act-latest")
        );
        assert_eq!(
            img("ubuntu-22.04").as_deref(),
            Some("catthehacker/ubuntu:act-22.04")
        );
        assert_eq!(img("windows-latest"), None);
        assert_eq!(img("self-hosted"), None);
        // A mapped label wins over a later ubuntu label.
        let mut m = RunnerImages::default();
        m.set("gpu", "my/gpu:1");
        assert_eq!(
            m.image_for(&["self-hosted".into(), "ubuntu-18.04".into(), "gpu".into()])
                .as_deref(),
            Some("my/gpu:1")
        );
    }

    #[test]
    fn computed_env_and_unmapped_runs_on_no_longer_fail_the_file() {
        let text = "on: push\nenv: ${{ fromJSON(vars.ENV) }}\njobs:\n  \
                    a:\n    runs-on: [self-hosted, linux]\n    steps: [{run: x}]\n  \
                    b:\n    runs-on: ubuntu-18.04\n    env: ${{ matrix.env }}\n    steps: [{run: x}]\n";
        let w = crate::github::parse(
            "w.yml",
            text,
            &LocalContext::new("/p", "p"),
            &Options::default(),
        )
        .unwrap();
        let names: Vec<_> = w.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(
            w.unmapped,
            [(
                "a".to_string(),
                "runs-on `self-hosted, linux` has no image: pass -P self-hosted=IMAGE or \
                 --image IMAGE"
                    .to_string()
            )]
        );
        assert!(
            w.warnings
                .iter()
                .any(|x| x.starts_with("env: `env` computed")),
            "{:?}",
            w.warnings
        );
        assert!(
            w.warnings.iter().any(|x| x.starts_with("jobs.b.env:")),
            "{:?}",
            w.warnings
        );
    }
}
