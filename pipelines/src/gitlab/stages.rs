//! `stages:` (or the legacy `types:`): the stage list, `.pre` first and
//! `.post` last, and the stage order jobs are sorted into.

use std::collections::HashMap;

use serde_yaml::Mapping;

use super::Parser;
use crate::error::Result;
use crate::spec::JobSpec;
use crate::yaml::{key, strings};

/// GitLab's default `stages`.
pub const DEFAULT_STAGES: [&str; 5] = [".pre", "build", "test", "deploy", ".post"];

impl Parser<'_> {
    /// The pipeline's stages: [`DEFAULT_STAGES`] without a `stages:` key,
    /// else the list given between `.pre` and `.post`.
    pub(super) fn stages(&self, top: &Mapping) -> Result<Vec<String>> {
        Ok(match top.get("stages").or_else(|| top.get("types")) {
            None => DEFAULT_STAGES.iter().map(|s| s.to_string()).collect(),
            Some(v) => {
                let list = strings(v).ok_or_else(|| {
                    self.err(&[key("stages")], "`stages` must be a list of strings")
                })?;
                let mut s = vec![".pre".to_string()];
                s.extend(list.into_iter().filter(|x| x != ".pre" && x != ".post"));
                s.push(".post".to_string());
                s
            }
        })
    }
}

/// Each stage's position; a stage listed twice keeps its first.
pub(super) fn stage_positions(stages: &[String]) -> HashMap<String, usize> {
    let mut stage_pos: HashMap<String, usize> = HashMap::with_capacity(stages.len());
    for (i, s) in stages.iter().enumerate() {
        stage_pos.entry(s.clone()).or_insert(i);
    }
    stage_pos
}

/// Sorts jobs by stage, keeping file order within a stage.
pub(super) fn sort_by_stage(jobs: &mut [JobSpec], stage_pos: &HashMap<String, usize>) {
    let pos_of = |j: &JobSpec| {
        j.stage
            .as_ref()
            .and_then(|s| stage_pos.get(s).copied())
            .unwrap_or(0)
    };
    jobs.sort_by_key(pos_of);
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{names, parse_ok};
    use super::*;

    #[test]
    fn default_stages_without_a_stages_key() {
        let p = parse_ok("a:\n  script: x\n");
        assert_eq!(p.stages, DEFAULT_STAGES.map(String::from).to_vec());
    }

    #[test]
    fn pre_and_post_are_moved_to_the_ends() {
        let p = parse_ok("stages: [.post, b, .pre, a]\nj:\n  stage: a\n  script: x\n");
        assert_eq!(p.stages, [".pre", "b", "a", ".post"]);
        let p = parse_ok("types: [one]\nj:\n  stage: one\n  script: x\n");
        assert_eq!(p.stages, [".pre", "one", ".post"]);
    }

    #[test]
    fn jobs_are_sorted_by_stage_then_file_order() {
        let p = parse_ok(
            "stages: [build, test]\n\
             t1:\n  stage: test\n  script: x\n\
             b1:\n  stage: build\n  script: x\n\
             post:\n  stage: .post\n  script: x\n\
             t2:\n  stage: test\n  script: x\n\
             pre:\n  stage: .pre\n  script: x\n\
             b2:\n  stage: build\n  script: x\n",
        );
        assert_eq!(names(&p), ["pre", "b1", "b2", "t1", "t2", "post"]);
    }

    #[test]
    fn first_position_of_a_repeated_stage_wins() {
        let pos = stage_positions(&["a".into(), "b".into(), "a".into()]);
        assert_eq!(pos["a"], 0);
        assert_eq!(pos["b"], 1);
    }

    #[test]
    fn stages_must_be_strings() {
        let e = super::super::test_util::parse_err("stages: {a: 1}\n");
        assert!(e.contains("`stages` must be a list of strings"), "{e}");
        assert!(e.contains(":1:1:"), "{e}");
    }
}
