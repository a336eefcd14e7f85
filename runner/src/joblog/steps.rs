//! How a step is announced in a job log: the header a local run prints and
//! the section a GitLab trace opens. One place for both, so that the two
//! providers name GitLab's steps alike.

/// The header a GitLab trace shows for a step's section: gitlab-runner's
/// stage line for the script steps.
pub fn section_header(step: &str) -> String {
    match step {
        "after_script" => "Running after_script".to_string(),
        n => format!("Executing \"step_{n}\" stage of the job {n}"),
    }
}

/// The name of a step's section in a GitLab trace (`step_script`,
/// `after_script`, ...).
pub fn section_name(step: &str) -> String {
    if step == "after_script" {
        step.to_string()
    } else {
        format!("step_{step}")
    }
}

/// The header a local run prints when a step starts, reading like the
/// provider's log: GitLab's stage lines for `script`/`after_script`,
/// GitHub's `Run ...` for named steps.
pub fn step_header(name: &str) -> String {
    match name {
        "script" | "after_script" => section_header(name),
        n if n.starts_with("Run ") => n.to_string(),
        n => format!("Run {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_like_the_providers_logs() {
        assert_eq!(
            step_header("script"),
            "Executing \"step_script\" stage of the job script"
        );
        assert_eq!(step_header("after_script"), "Running after_script");
        assert_eq!(step_header("Run cargo test"), "Run cargo test");
        assert_eq!(step_header("build"), "Run build");
    }

    #[test]
    fn gitlab_sections_are_named_like_gitlab_runners() {
        assert_eq!(section_name("script"), "step_script");
        assert_eq!(section_name("after_script"), "after_script");
        assert_eq!(
            section_header("release"),
            "Executing \"step_release\" stage of the job release"
        );
    }
}
