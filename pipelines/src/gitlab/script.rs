//! A job's scripts as steps: `before_script` + `script` as one step,
//! `after_script` as a second that always runs (and may fail), each
//! rendered into a shell script behind [`PREAMBLE`].

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::Parser;
use crate::error::Result;
use crate::limits::{bytes, short};
use crate::spec::{Shell, Step, StepWhen};
use crate::yaml::{key, scalar, Seg};

/// `after_script` timeout (gitlab-runner `RUNNER_AFTER_SCRIPT_TIMEOUT`).
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The script preamble; see the [module docs](super).
pub const PREAMBLE: &str = "\
# kiln: GitLab runs job scripts with bash when the image has it, else sh.
if [ -z \"${BASH_VERSION:-}\" ] && command -v bash >/dev/null 2>&1; then exec bash \"$0\" \"$@\"; fi
case \"$(set -o)\" in *pipefail*) set -o pipefail ;; esac
set -o errexit
set +o noclobber
";

impl Parser<'_> {
    /// The steps of job `key_name`: `script` (with `before_script`), and
    /// `after_script` when it has commands.
    pub(super) fn steps(&self, key_name: &str, job: &Mapping) -> Result<Vec<Step>> {
        let at = |k: &str| [key(key_name), key(k)];
        let mut commands = Vec::new();
        for k in ["before_script", "script"] {
            if let Some(v) = job.get(k) {
                commands.extend(script_lines(v, self.limits.max_script_lines).ok_or_else(
                    || {
                        self.err(
                            &at(k),
                            format!("`{k}` must be a string or a list of strings"),
                        )
                    },
                )?);
            }
        }
        if !job.contains_key("script") {
            return Err(self.err(
                &[key(key_name)],
                format!("job `{}` has no `script`", short(key_name)),
            ));
        }
        let script = self.render_checked(&commands, &at("script"))?;
        let mut steps = vec![Step {
            name: "script".into(),
            ..Step::script("", script)
        }];
        if let Some(v) = job.get("after_script") {
            let after = script_lines(v, self.limits.max_script_lines).ok_or_else(|| {
                self.err(
                    &at("after_script"),
                    "`after_script` must be a string or list of strings",
                )
            })?;
            if !after.is_empty() {
                let script = self.render_checked(&after, &at("after_script"))?;
                steps.push(Step {
                    when: StepWhen::Always,
                    timeout: Some(AFTER_SCRIPT_TIMEOUT),
                    allow_failure: true,
                    ..Step::script("after_script", script)
                });
            }
        }
        for s in &mut steps {
            s.shell = Shell::Sh;
        }
        Ok(steps)
    }

    /// [`render`], once the commands are known to fit the script limits.
    fn render_checked(&self, commands: &[String], path: &[Seg]) -> Result<String> {
        if commands.len() > self.limits.max_script_lines {
            return Err(self.limit(
                path,
                format!(
                    "more than {} script lines (max_script_lines)",
                    self.limits.max_script_lines
                ),
            ));
        }
        // Each command is echoed, so it counts twice, plus its check.
        let size = commands
            .iter()
            .map(|c| 2 * c.len() + 80)
            .fold(PREAMBLE.len(), usize::saturating_add);
        if size > self.limits.max_script_bytes {
            return Err(self.limit(
                path,
                format!(
                    "the script comes to more than {} (max_script_bytes)",
                    bytes(self.limits.max_script_bytes)
                ),
            ));
        }
        Ok(render(commands))
    }
}

/// The script file for a list of commands; see the module docs.
pub fn render(commands: &[String]) -> String {
    let mut s = String::from(PREAMBLE);
    for cmd in commands {
        let shown = match cmd.trim_end().split_once('\n') {
            Some((first, _)) => format!("$ {first} # collapsed multi-line command"),
            None => format!("$ {}", cmd.trim_end()),
        };
        s.push_str(&format!("printf '%s\\n' {}\n", shell_quote(&shown)));
        s.push_str(cmd.trim_end());
        s.push_str("\n_kiln_rc=$?; if [ \"$_kiln_rc\" -ne 0 ]; then exit \"$_kiln_rc\"; fi\n");
    }
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Script entries, flattening nested lists (anchors and `!reference`
/// often produce them). Stops a little past `cap` entries; the caller
/// checks the count.
fn script_lines(v: &Value, cap: usize) -> Option<Vec<String>> {
    fn walk(v: &Value, depth: usize, out: &mut Vec<String>, cap: usize) -> Option<()> {
        match v {
            Value::Sequence(s) if depth < 10 => {
                for x in s {
                    if out.len() > cap {
                        break;
                    }
                    walk(x, depth + 1, out, cap)?;
                }
                Some(())
            }
            Value::Sequence(_) | Value::Mapping(_) => None,
            Value::Null => Some(()),
            other => {
                out.push(scalar(other)?);
                Some(())
            }
        }
    }
    let mut out = Vec::new();
    walk(v, 0, &mut out, cap)?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{commands, job, parse_err, parse_ok};
    use super::*;

    #[test]
    fn before_script_and_script_are_one_step_after_script_another() {
        let p = parse_ok(
            "j:\n  before_script: [setup]\n  script: [build, [nested, list]]\n\
             \x20 after_script: cleanup\n",
        );
        let steps = &job(&p, "j").steps;
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].name, "script");
        assert_eq!(
            commands(&steps[0].script),
            ["setup", "build", "nested", "list"]
        );
        assert_eq!(steps[0].when, StepWhen::OnSuccess);
        assert!(!steps[0].allow_failure);
        assert_eq!(steps[1].name, "after_script");
        assert_eq!(commands(&steps[1].script), ["cleanup"]);
        assert_eq!(steps[1].when, StepWhen::Always);
        assert_eq!(steps[1].timeout, Some(AFTER_SCRIPT_TIMEOUT));
        assert!(steps[1].allow_failure);
        assert!(steps.iter().all(|s| s.shell == Shell::Sh));
    }

    #[test]
    fn an_empty_after_script_adds_no_step() {
        let p = parse_ok("j:\n  script: x\n  after_script: []\n");
        assert_eq!(job(&p, "j").steps.len(), 1);
    }

    #[test]
    fn render_echoes_quoted_and_checks_each_command() {
        let s = render(&[
            "echo 'hi'".to_string(),
            "for x in 1; do\n  :\ndone\n".to_string(),
        ]);
        let body = s.strip_prefix(PREAMBLE).unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines[0], r"printf '%s\n' '$ echo '\''hi'\'''");
        assert_eq!(lines[1], "echo 'hi'");
        assert!(lines[2].starts_with("_kiln_rc=$?;"));
        assert_eq!(
            lines[3],
            r"printf '%s\n' '$ for x in 1; do # collapsed multi-line command'"
        );
        assert_eq!(&lines[4..7], ["for x in 1; do", "  :", "done"]);
    }

    #[test]
    fn script_shape_and_presence_are_checked() {
        let e = parse_err("j:\n  before_script: [x]\n");
        assert!(e.contains(":1:1: j: job `j` has no `script`"), "{e}");
        let e = parse_err("j:\n  script: {a: b}\n");
        assert!(
            e.contains(":2:3: j.script: `script` must be a string"),
            "{e}"
        );
        let v: Value = serde_yaml::from_str("[a, [b, [c]], null, 1]").unwrap();
        assert_eq!(script_lines(&v, 100).unwrap(), ["a", "b", "c", "1"]);
        let v: Value = serde_yaml::from_str("[a, {b: c}]").unwrap();
        assert_eq!(script_lines(&v, 100), None);
    }
}
