//! Workflow commands a step prints on its output (`::set-output name=x::v`,
//! `::add-mask::v`, `::group::name`, ...), read the way `actions/runner`
//! reads them (`ActionCommand.TryParseV2`): leading whitespace trimmed, then
//! `::NAME[ k=v,k=v]::DATA`, data and property values unescaped (`%25`,
//! `%0D`, `%0A`; properties also `%3A`, `%2C`). Names the runner does not
//! know leave the line as plain output.
//!
//! This module only parses; the executor streams a step's output through it
//! (`runner/src/executor/workflow.rs`) and applies what it finds.

/// One workflow command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkflowCommand {
    /// `::set-output name=NAME::VALUE` (legacy; `$GITHUB_OUTPUT` today).
    SetOutput { name: String, value: String },
    /// `::add-mask::VALUE`: mask VALUE in the rest of the job's output.
    AddMask(String),
    /// `::group::TITLE`: a collapsible section starts.
    Group(String),
    /// `::endgroup::`.
    EndGroup,
    /// `::warning ...::MSG`, `::error ...::MSG`, `::notice ...::MSG`:
    /// annotations, shown as GitHub's log shows them.
    Annotation {
        level: &'static str,
        message: String,
    },
    /// `::debug::MSG`: shown only with step debug logging; kiln drops it.
    Debug(String),
    /// `::stop-commands::TOKEN`: no commands until a line `::TOKEN::`.
    StopCommands(String),
    /// `::set-env` and `::add-path`: disabled on GitHub (an error there).
    Disabled(&'static str),
    /// `::save-state`, `::echo`, `::add-matcher`, `::remove-matcher`:
    /// known to the runner, nothing for kiln to do.
    Ignored,
}

/// Parses one output line (without its line ending). `None`: plain output.
pub fn parse_command(line: &str) -> Option<WorkflowCommand> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line.trim_start().strip_prefix("::")?;
    let end = rest.find("::")?;
    let info = &rest[..end];
    let data = &rest[end + 2..];
    let (name, props) = match info.find(' ') {
        Some(i) => (&info[..i], &info[i + 1..]),
        None => (info, ""),
    };
    let prop = |key: &str| -> Option<String> {
        props
            .trim()
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .find(|(k, v)| *k == key && !v.is_empty())
            .map(|(_, v)| unescape_property(v))
    };
    let data = || unescape_data(data);
    Some(match name {
        "set-output" => WorkflowCommand::SetOutput {
            name: prop("name")?,
            value: data(),
        },
        "add-mask" => WorkflowCommand::AddMask(data()),
        "group" => WorkflowCommand::Group(data()),
        "endgroup" => WorkflowCommand::EndGroup,
        "warning" | "error" | "notice" => WorkflowCommand::Annotation {
            level: match name {
                "warning" => "warning",
                "error" => "error",
                _ => "notice",
            },
            message: data(),
        },
        "debug" => WorkflowCommand::Debug(data()),
        "stop-commands" => WorkflowCommand::StopCommands(data()),
        "set-env" => WorkflowCommand::Disabled("set-env"),
        "add-path" => WorkflowCommand::Disabled("add-path"),
        "save-state" | "echo" | "add-matcher" | "remove-matcher" => WorkflowCommand::Ignored,
        _ => return None,
    })
}

/// Whether `line` resumes commands after `::stop-commands::TOKEN`.
pub fn resumes_commands(line: &str, token: &str) -> bool {
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.trim_start()
        .strip_prefix("::")
        .and_then(|r| r.strip_prefix(token))
        .is_some_and(|r| r.starts_with("::"))
        && !token.is_empty()
}

/// How GitHub's raw log shows a command that is shown at all: `##[group]`,
/// `##[endgroup]`, `##[warning]`, `##[error]`, `##[notice]` lines.
pub fn log_line(cmd: &WorkflowCommand) -> Option<String> {
    match cmd {
        WorkflowCommand::Group(title) => Some(format!("##[group]{title}")),
        WorkflowCommand::EndGroup => Some("##[endgroup]".into()),
        WorkflowCommand::Annotation { level, message } => Some(format!("##[{level}]{message}")),
        WorkflowCommand::Disabled(name) => Some(format!(
            "##[error]The `{name}` command is disabled. Please upgrade to using Environment Files (kiln does as GitHub does)"
        )),
        _ => None,
    }
}

fn unescape_data(s: &str) -> String {
    s.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%25", "%")
}

fn unescape_property(s: &str) -> String {
    s.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%3A", ":")
        .replace("%2C", ",")
        .replace("%25", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_like_the_runner() {
        assert_eq!(
            parse_command("::set-output name=ver::1.2%0A3"),
            Some(WorkflowCommand::SetOutput {
                name: "ver".into(),
                value: "1.2\n3".into()
            })
        );
        assert_eq!(
            parse_command("  ::add-mask::s3cr%25t\r"),
            Some(WorkflowCommand::AddMask("s3cr%t".into()))
        );
        assert_eq!(
            parse_command("::group::Build it"),
            Some(WorkflowCommand::Group("Build it".into()))
        );
        assert_eq!(
            parse_command("::endgroup::"),
            Some(WorkflowCommand::EndGroup)
        );
        assert_eq!(
            parse_command("::warning file=a.rs,line=3::careful"),
            Some(WorkflowCommand::Annotation {
                level: "warning",
                message: "careful".into()
            })
        );
        assert_eq!(
            parse_command("::set-output name=a%2Cb::v"),
            Some(WorkflowCommand::SetOutput {
                name: "a,b".into(),
                value: "v".into()
            })
        );
        assert_eq!(
            parse_command("::set-env name=A::1"),
            Some(WorkflowCommand::Disabled("set-env"))
        );
    }

    #[test]
    fn plain_lines_stay_plain() {
        for line in [
            "hello",
            ":: not a command",
            "::unknown-cmd::x",
            "::set-output::no name",
            "echo ::set-output name=a::b",
            "::group",
        ] {
            assert_eq!(parse_command(line), None, "{line}");
        }
        assert!(resumes_commands("::tok123::", "tok123"));
        assert!(!resumes_commands("::tok::", "tok123"));
        assert!(!resumes_commands("::::", ""));
    }

    #[test]
    fn shown_commands_read_like_githubs_raw_log() {
        assert_eq!(
            log_line(&WorkflowCommand::Group("g".into())).as_deref(),
            Some("##[group]g")
        );
        assert_eq!(
            log_line(&WorkflowCommand::EndGroup).as_deref(),
            Some("##[endgroup]")
        );
        assert_eq!(log_line(&WorkflowCommand::AddMask("x".into())), None);
    }
}
