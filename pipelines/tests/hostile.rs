//! Hostile pipeline files: each test feeds one kind of attack (or careless
//! input) to the front ends and checks that kiln refuses it with a short,
//! clear error, in bounded memory, without touching anything outside the
//! project.
//!
//! Every case runs in a child process (this test binary, re-executed with
//! `KILN_HOSTILE_CHILD=<case>` and the test name as an exact filter), which
//! reports its outcome and its peak memory (`VmHWM` from
//! `/proc/self/status`). A stack overflow or an allocation failure kills the
//! child and fails the test with its output.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_pipelines::{github, gitlab, LocalContext, Options, ProjectFiles};

mod common;
use common::many_jobs;
use kiln_testkit::error_chain;

const CHILD_ENV: &str = "KILN_HOSTILE_CHILD";
const MIB: u64 = 1024;

/// What a case returned in its child process.
#[derive(Debug)]
struct Report {
    /// The error message and its sources, or `None` when the case succeeded.
    error: Option<String>,
    /// What a successful case wants to show.
    summary: String,
    /// Peak resident memory of the child, in KiB.
    hwm_kib: u64,
}

/// Runs `f` in a child process when this test is the parent; acts as the
/// child (runs `f`, prints the outcome, exits) when `KILN_HOSTILE_CHILD`
/// names `case`. Returns `None` in a child started for another case.
fn measured(case: &str, f: fn() -> Result<String, String>) -> Option<Report> {
    match std::env::var(CHILD_ENV) {
        Ok(c) if c == case => {
            let out = f();
            let hwm = vm_hwm_kib();
            // On a line of its own: the harness has printed `test NAME ... `.
            match out {
                Ok(summary) => println!("\nKILN-HOSTILE ok {hwm} {}", summary.escape_default()),
                Err(e) => println!("\nKILN-HOSTILE err {hwm} {}", e.escape_default()),
            }
            std::process::exit(0);
        }
        Ok(_) => return None,
        Err(_) => {}
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .output()
        .expect("re-running the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("KILN-HOSTILE ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "case {case} reported nothing (status {}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut parts = line.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let hwm_kib = parts.next().and_then(|h| h.parse().ok()).unwrap_or(0);
    let text = unescape(parts.next().unwrap_or_default());
    let report = Report {
        error: (kind == "err").then(|| text.clone()),
        summary: text,
        hwm_kib,
    };
    eprintln!(
        "{case}: peak {} MiB; {}",
        report.hwm_kib / MIB,
        report.summary
    );
    Some(report)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('u') => {
                let hex: String = chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The case's error, checked to be short and printable, and to name
/// `expect` (the file and line, or the limit).
fn refused(r: Report, max_mib: u64, expect: &[&str]) -> String {
    let e = r
        .error
        .unwrap_or_else(|| panic!("expected an error, got: {}", r.summary));
    assert!(e.len() < 1024, "error is {} bytes: {e}", e.len());
    assert!(
        !e.chars().any(|c| c.is_control() && c != '\n'),
        "control characters in {e:?}"
    );
    for x in expect {
        assert!(e.contains(x), "error does not mention {x:?}: {e}");
    }
    assert!(
        r.hwm_kib < max_mib * MIB,
        "peak memory {} MiB, bound {max_mib} MiB",
        r.hwm_kib / MIB
    );
    e
}

fn ctx() -> LocalContext {
    let mut c = LocalContext::new("/nonexistent-kiln-project", "demo");
    c.branch = Some("main".into());
    c
}

fn no_files(_: &str) -> io::Result<String> {
    Err(io::Error::new(io::ErrorKind::NotFound, "no files here"))
}

/// Parses `text` as `name` through the common entry point (format detected
/// from the name or the keys).
fn load(name: &str, text: &str) -> Result<String, String> {
    load_with(name, text, &no_files)
}

fn load_with(
    name: &str,
    text: &str,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Result<String, String> {
    kiln_pipelines::load(Path::new(name), text, &ctx(), &Options::default(), read)
        .map(|p| format!("{} jobs", p.jobs.len()))
        .map_err(|e| error_chain(&e))
}

fn gitlab_text(text: &str, read: &dyn Fn(&str) -> io::Result<String>) -> Result<String, String> {
    gitlab::parse(".gitlab-ci.yml", text, &ctx(), &Options::default(), read)
        .map(|p| format!("{} jobs", p.jobs.len()))
        .map_err(|e| error_chain(&e))
}

fn github_text(text: &str) -> Result<String, String> {
    github::parse("ci.yml", text, &ctx(), &Options::default())
        .map(|w| format!("{} jobs", w.jobs.len()))
        .map_err(|e| error_chain(&e))
}

/// A per-test directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("kiln-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- YAML size

/// ~1 MB: a 512 KiB list, and 60,000 aliases to it (fewer jumps than
/// serde_yaml's repetition limit allows). Expanded, about 30 GB.
fn alias_bomb() -> String {
    let mut s = String::from("base: &b [");
    for i in 0..8192 {
        s.push_str(&format!("\"{:060}\", ", i));
    }
    s.push_str("]\njob:\n  script: [");
    for _ in 0..60_000 {
        s.push_str("*b, ");
    }
    s.push_str("]\n");
    s
}

#[test]
fn alias_bomb_stops_at_the_yaml_budget() {
    let Some(r) = measured("alias_bomb_stops_at_the_yaml_budget", || {
        load(".gitlab-ci.yml", &alias_bomb())
    }) else {
        return;
    };
    let e = refused(r, 200, &[".gitlab-ci.yml:", "max_yaml_bytes"]);
    assert!(e.contains("aliases"), "{e}");
}

#[test]
fn alias_bomb_in_a_file_of_unknown_kind() {
    // `detect` has to parse the file to look at its keys: the same budget.
    let Some(r) = measured("alias_bomb_in_a_file_of_unknown_kind", || {
        load("ci.yml", &alias_bomb())
    }) else {
        return;
    };
    refused(
        r,
        200,
        &["ci.yml:", "max_yaml_bytes", "neither named .gitlab-ci.yml"],
    );
    assert_eq!(
        kiln_pipelines::detect(Path::new("ci.yml"), &alias_bomb()),
        kiln_pipelines::Format::Unknown
    );
}

#[test]
fn deep_nesting_is_refused_without_recursing() {
    let Some(r) = measured("deep_nesting_is_refused_without_recursing", || {
        let text = format!(
            "job:\n  script: {}x{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        load(".gitlab-ci.yml", &text)
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:"]);
}

#[test]
fn nesting_past_gitlab_depth_is_a_limit() {
    let Some(r) = measured("nesting_past_gitlab_depth_is_a_limit", || {
        let text = format!("job:\n  script: {}x{}\n", "[".repeat(110), "]".repeat(110));
        load(".gitlab-ci.yml", &text)
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:2:", "max_yaml_depth"]);
}

#[test]
fn file_larger_than_the_limit_is_not_parsed() {
    let Some(r) = measured("file_larger_than_the_limit_is_not_parsed", || {
        let text = format!("job:\n  script: x\n#{}\n", "x".repeat(5 << 20));
        load(".gitlab-ci.yml", &text)
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml", "max_file_bytes"]);
}

#[test]
fn merge_key_loop_is_an_error() {
    let Some(r) = measured("merge_key_loop_is_an_error", || {
        load(
            ".gitlab-ci.yml",
            "a: &a\n  x: 1\n  <<: *a\njob:\n  <<: *a\n  script: x\n",
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:"]);
}

#[test]
fn long_hostile_keys_are_quoted_short() {
    let Some(r) = measured("long_hostile_keys_are_quoted_short", || {
        // `\e` in a double-quoted scalar is ESC; explicit keys may be long.
        let k = format!("\"\\e[2J{}\"", "k".repeat(1 << 20));
        // GitHub refuses duplicate keys (GitLab lets the later one win).
        load(
            ".github/workflows/ci.yml",
            &format!("? {k}\n: 1\n? {k}\n: 2\n"),
        )
    }) else {
        return;
    };
    let e = refused(r, 100, &[".github/workflows/ci.yml:", "duplicate key", "…"]);
    assert!(e.contains("\\u{1b}"), "escape not escaped: {e}");
}

// ---------------------------------------------------------------- detect

#[test]
fn detect_keeps_the_real_yaml_error() {
    let Some(r) = measured("detect_keeps_the_real_yaml_error", || {
        load("pipeline.yml", "build:\n  script: [make\n  stage: test\n")
    }) else {
        return;
    };
    let e = refused(
        r,
        100,
        &[
            "pipeline.yml:",
            "invalid YAML",
            "tell a .gitlab-ci.yml from a GitHub workflow",
        ],
    );
    assert!(!e.contains("neither a .gitlab-ci.yml nor"), "{e}");
    // The position is the parser's, not 1:1.
    assert!(!e.starts_with("pipeline.yml:1:1"), "{e}");
}

#[test]
fn detect_says_what_it_assumed() {
    let Some(r) = measured("detect_says_what_it_assumed", || {
        load(
            "pipeline.yml",
            "stages: [build]\njob:\n  stage: nope\n  script: x\n",
        )
    }) else {
        return;
    };
    refused(r, 100, &["pipeline.yml:3:", "read as a .gitlab-ci.yml"]);
}

// ---------------------------------------------------------------- includes

#[test]
fn include_symlink_out_of_the_project_is_refused() {
    let Some(r) = measured("include_symlink_out_of_the_project_is_refused", || {
        let d = TempDir::new("symlink");
        let proj = d.0.join("proj");
        std::fs::create_dir_all(proj.join("ci")).unwrap();
        std::fs::write(d.0.join("outside.yml"), "stolen:\n  script: [cat]\n").unwrap();
        std::os::unix::fs::symlink(d.0.join("outside.yml"), proj.join("ci/evil.yml")).unwrap();
        std::fs::write(proj.join("ci/real.yml"), "inner:\n  script: [x]\n").unwrap();
        std::os::unix::fs::symlink("real.yml", proj.join("ci/good.yml")).unwrap();
        let files = ProjectFiles::new(&proj, &Options::default().limits);
        let read = |p: &str| files.read(p);
        // A link that stays inside is followed.
        let ok = gitlab_text("include: ci/good.yml\njob:\n  script: x\n", &read)?;
        assert_eq!(ok, "2 jobs");
        let escaped = gitlab_text("include: ci/evil.yml\njob:\n  script: x\n", &read);
        let dotdot = gitlab_text("include: ci/../../outside.yml\njob:\n  script: x\n", &read);
        assert!(
            dotdot
                .as_ref()
                .is_err_and(|e| e.contains("leaves the project")),
            "{dotdot:?}"
        );
        escaped
    }) else {
        return;
    };
    refused(r, 100, &["ci/evil.yml", "outside the project"]);
}

#[test]
fn include_of_a_fifo_does_not_block() {
    let Some(r) = measured("include_of_a_fifo_does_not_block", || {
        let d = TempDir::new("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.0.join("pipe.yml"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| format!("mkfifo: {e}"))?;
        let files = ProjectFiles::new(&d.0, &Options::default().limits);
        gitlab_text("include: pipe.yml\njob:\n  script: x\n", &|p| files.read(p))
    }) else {
        return;
    };
    refused(r, 100, &["pipe.yml", "not a regular file"]);
}

#[test]
fn too_many_includes() {
    let Some(r) = measured("too_many_includes", || {
        let list: String = (0..200).map(|i| format!("  - f{i}.yml\n")).collect();
        let text = format!("include:\n{list}job:\n  script: x\n");
        gitlab_text(&text, &|p| {
            Ok(format!("{}:\n  script: x\n", p.replace('.', "_")))
        })
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:", "max_includes"]);
}

#[test]
fn includes_nested_too_deep() {
    let Some(r) = measured("includes_nested_too_deep", || {
        gitlab_text("include: f0.yml\njob:\n  script: x\n", &|p| {
            let n: u32 = p[1..p.len() - 4].parse().unwrap_or(0);
            Ok(format!("include: f{}.yml\n", n + 1))
        })
    }) else {
        return;
    };
    refused(r, 100, &["f99.yml:1:1", "max_include_depth"]);
}

#[test]
fn include_cycle_terminates() {
    let Some(r) = measured("include_cycle_terminates", || {
        gitlab_text("include: a.yml\njob:\n  script: x\n", &|p| {
            Ok(match p {
                "a.yml" => "include: b.yml\na:\n  script: x\n".into(),
                _ => "include: a.yml\nb:\n  script: x\n".into(),
            })
        })
    }) else {
        return;
    };
    assert_eq!(r.error, None);
    assert_eq!(r.summary, "3 jobs");
}

// ---------------------------------------------------------------- fan-out

#[test]
fn extends_fan_out_stops_at_the_output_budget() {
    let Some(r) = measured("extends_fan_out_stops_at_the_output_budget", || {
        // A 1 MiB template, extended by 2,000 jobs: 2 GiB if copied.
        let mut s = String::from(".t:\n  variables:\n    BIG: \"");
        s.push_str(&"x".repeat(1 << 20));
        s.push_str("\"\n  script: x\n");
        for i in 0..2000 {
            s.push_str(&format!("j{i}: {{extends: .t}}\n"));
        }
        load(".gitlab-ci.yml", &s)
    }) else {
        return;
    };
    refused(r, 800, &[".gitlab-ci.yml:", "max_output_bytes"]);
}

#[test]
fn default_before_script_fan_out_is_bounded() {
    let Some(r) = measured("default_before_script_fan_out_is_bounded", || {
        let mut s = String::from("default:\n  before_script:\n");
        for i in 0..1000 {
            s.push_str(&format!("    - echo {i}{}\n", "y".repeat(100)));
        }
        for i in 0..5000 {
            s.push_str(&format!("j{i}: {{script: x}}\n"));
        }
        load(".gitlab-ci.yml", &s)
    }) else {
        return;
    };
    refused(r, 800, &[".gitlab-ci.yml:", "max_output_bytes"]);
}

#[test]
fn reference_to_itself_is_a_cycle() {
    let Some(r) = measured("reference_to_itself_is_a_cycle", || {
        // A reference that resolves works; one to itself does not.
        let ok = load(
            ".gitlab-ci.yml",
            ".setup:\n  script: [echo a, echo b]\njob:\n  script:\n    - !reference [.setup, script]\n    - echo c\n",
        )?;
        assert_eq!(ok, "1 jobs");
        load(
            ".gitlab-ci.yml",
            ".a:\n  script: [!reference [.a, script]]\njob:\n  script: x\n",
        )
    }) else {
        return;
    };
    refused(
        r,
        100,
        &[
            ".gitlab-ci.yml:1:",
            "`!reference` cycle: .a.script -> .a.script",
        ],
    );
}

#[test]
fn reference_nesting_and_fan_out_are_bounded() {
    let Some(r) = measured("reference_nesting_and_fan_out_are_bounded", || {
        let mut s = String::new();
        s.push_str(".l0:\n  s: [x]\n");
        for i in 1..=12 {
            s.push_str(&format!(
                ".l{i}:\n  s: [!reference [.l{p}, s], !reference [.l{p}, s]]\n",
                p = i - 1
            ));
        }
        s.push_str("job:\n  script: [!reference [.l12, s]]\n");
        let deep = load(".gitlab-ci.yml", &s);
        assert!(
            deep.as_ref()
                .is_err_and(|e| e.contains("max_reference_depth")),
            "{deep:?}"
        );
        // Doubling 10 times a 100 KiB list (within the nesting limit).
        let mut s = format!(".l0:\n  s: [\"{}\"]\n", "z".repeat(100 << 10));
        for i in 1..=10 {
            s.push_str(&format!(
                ".l{i}:\n  s: [!reference [.l{p}, s], !reference [.l{p}, s], !reference [.l{p}, s], !reference [.l{p}, s]]\n",
                p = i - 1
            ));
        }
        s.push_str("job:\n  script: [!reference [.l10, s]]\n");
        load(".gitlab-ci.yml", &s)
    }) else {
        return;
    };
    refused(r, 800, &[".gitlab-ci.yml:", "max_output_bytes"]);
}

#[test]
fn variable_expansion_bomb() {
    let Some(r) = measured("variable_expansion_bomb", || {
        let a = "a".repeat(4096);
        let b = "$A".repeat(2000);
        load(
            ".gitlab-ci.yml",
            &format!("variables:\n  A: {a}\n  B: \"{b}\"\njob:\n  script: x\n"),
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:", "`B`", "max_script_bytes"]);
}

#[test]
fn too_many_variables() {
    let Some(r) = measured("too_many_variables", || {
        let vars: String = (0..10_000).map(|i| format!("  V{i}: x\n")).collect();
        load(
            ".gitlab-ci.yml",
            &format!("variables:\n{vars}job:\n  script: x\n"),
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:1:", "max_variables"]);
}

#[test]
fn parallel_matrix_product_is_checked_before_it_is_built() {
    let Some(r) = measured(
        "parallel_matrix_product_is_checked_before_it_is_built",
        || {
            let vals: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
            let list = vals.join(", ");
            load(
            ".gitlab-ci.yml",
            &format!("job:\n  script: x\n  parallel:\n    matrix:\n      - A: [{list}]\n        B: [{list}]\n        C: [{list}]\n"),
        )
        },
    ) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:", "max_parallel"]);
}

#[test]
fn github_matrix_product_is_checked_before_it_is_built() {
    let Some(r) = measured(
        "github_matrix_product_is_checked_before_it_is_built",
        || {
            let vals: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
            let list = vals.join(", ");
            github_text(&format!(
            "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    strategy:\n      matrix:\n        a: [{list}]\n        b: [{list}]\n        c: [{list}]\n    steps:\n      - run: x\n"
        ))
        },
    ) else {
        return;
    };
    refused(r, 100, &["ci.yml:6:", "max_matrix"]);
}

// ---------------------------------------------------------------- expressions

#[test]
fn github_expression_nesting_and_length() {
    let Some(r) = measured("github_expression_nesting_and_length", || {
        let wf = |expr: &str| {
            github_text(&format!(
                "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{{{ {expr} }}}}\n"
            ))
        };
        let chain = format!("github{}", ".a".repeat(9000));
        let e = wf(&chain).unwrap_err();
        assert!(e.contains("max_expression_depth"), "{e}");
        assert!(e.len() < 1024, "{e}");
        let nots = format!("{}true", "!".repeat(15_000));
        assert!(wf(&nots).unwrap_err().contains("max_expression_depth"));
        let ands = vec!["true"; 2000].join(" && ");
        assert!(wf(&ands).unwrap_err().contains("max_expression_depth"));
        let long = format!("'{}'", "x".repeat(30_000));
        assert!(wf(&long).unwrap_err().contains("max_expression_bytes"));
        // 1000 copies of 1000 copies of a 1 KiB string: 1 GB if built.
        let k = format!("'{}'", "k".repeat(1024));
        let f1000 = format!("'{}'", "{0}".repeat(1000));
        let bomb = format!("format({f1000}, format({f1000}, {k}))");
        wf(&bomb)
    }) else {
        return;
    };
    refused(r, 100, &["ci.yml:6:", "max_expression_output"]);
}

#[test]
fn gitlab_rules_if_nesting() {
    let Some(r) = measured("gitlab_rules_if_nesting", || {
        let deep = format!("{}$CI{}", "(".repeat(60), ")".repeat(60));
        let e = load(
            ".gitlab-ci.yml",
            &format!("job:\n  script: x\n  rules:\n    - if: '{deep}'\n"),
        )
        .unwrap_err();
        assert!(e.contains("max_expression_depth"), "{e}");
        let cond = format!("{}$CI{}", "(".repeat(100_000), ")".repeat(100_000));
        load(
            ".gitlab-ci.yml",
            &format!("job:\n  script: x\n  rules:\n    - if: '{cond}'\n"),
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:", "max_expression"]);
}

// ---------------------------------------------------------------- names

#[test]
fn job_names_with_control_characters_are_refused() {
    let Some(r) = measured("job_names_with_control_characters_are_refused", || {
        load(".gitlab-ci.yml", "\"ok\\e[31mred\":\n  script: x\n")
    }) else {
        return;
    };
    let e = refused(r, 100, &[".gitlab-ci.yml: ", "control character"]);
    assert!(e.contains("\\u{1b}"), "{e}");
}

#[test]
fn job_names_longer_than_gitlab_allows() {
    let Some(r) = measured("job_names_longer_than_gitlab_allows", || {
        let e = load(
            ".gitlab-ci.yml",
            &format!("{}:\n  script: x\n", "n".repeat(300)),
        )
        .unwrap_err();
        assert!(e.starts_with(".gitlab-ci.yml:1:1: "), "{e}");
        assert!(e.contains("max_job_name_chars"), "{e}");
        // Longer than YAML allows an implicit key: an explicit one.
        load(
            ".gitlab-ci.yml",
            &format!("? {}\n: {{script: x}}\n", "n".repeat(1 << 20)),
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml", "max_job_name_chars"]);
}

#[test]
fn github_job_ids_with_path_separators_are_refused() {
    let Some(r) = measured("github_job_ids_with_path_separators_are_refused", || {
        github_text(
            "on: push\njobs:\n  ../../x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: x\n",
        )
    }) else {
        return;
    };
    refused(r, 100, &["ci.yml:3:", "must start with a letter"]);
}

// ---------------------------------------------------------------- scripts

#[test]
fn script_line_and_size_limits() {
    let Some(r) = measured("script_line_and_size_limits", || {
        let lines = vec!["x"; 30_000].join(", ");
        let e = load(".gitlab-ci.yml", &format!("job:\n  script: [{lines}]\n")).unwrap_err();
        assert!(e.contains("max_script_lines"), "{e}");
        load(
            ".gitlab-ci.yml",
            &format!("job:\n  script: [\"{}\"]\n", "y".repeat(1 << 20)),
        )
    }) else {
        return;
    };
    refused(r, 100, &[".gitlab-ci.yml:2:", "max_script_bytes"]);
}

// ---------------------------------------------------------------- jobs and planning

#[test]
fn forty_five_thousand_jobs_parse_and_plan() {
    let Some(r) = measured("forty_five_thousand_jobs_parse_and_plan", || {
        let mut out = Vec::new();
        for n in [2_000, 45_000] {
            let text = many_jobs(n);
            let t = Instant::now();
            let p = gitlab::parse(
                ".gitlab-ci.yml",
                &text,
                &ctx(),
                &Options::default(),
                &no_files,
            )
            .map_err(|e| e.to_string())?;
            let parsed = t.elapsed();
            // The last deploy job without `needs` waits for every build and
            // test job (and their needs, which are among them).
            let i = (0..n)
                .rev()
                .find(|i| i % 3 == 2 && i % 10 != 9)
                .unwrap_or(0);
            let last = format!("j{i}");
            let order = p.run_order(&last).map_err(|e| e.to_string())?;
            let planned = t.elapsed() - parsed;
            assert_eq!(p.jobs.len(), n);
            assert_eq!(order.last().map(|j| j.name.as_str()), Some(last.as_str()));
            let earlier = (0..n).filter(|i| i % 3 != 2).count();
            assert_eq!(order.len(), 1 + earlier);
            out.push(format!(
                "{n} jobs ({} KiB): parse {:.2?}, plan {:.2?}",
                text.len() / 1024,
                parsed,
                planned
            ));
        }
        Ok(out.join("; "))
    }) else {
        return;
    };
    assert_eq!(r.error, None, "{}", r.summary);
    assert!(r.summary.contains("45000 jobs"), "{}", r.summary);
    assert!(r.hwm_kib < 1024 * MIB, "peak {} MiB", r.hwm_kib / MIB);
}

#[test]
fn more_jobs_than_the_limit() {
    let Some(r) = measured("more_jobs_than_the_limit", || {
        let jobs: String = (0..60_000)
            .map(|i| format!("j{i}: {{script: x}}\n"))
            .collect();
        load(".gitlab-ci.yml", &jobs)
    }) else {
        return;
    };
    refused(r, 1024, &[".gitlab-ci.yml:", "max_jobs"]);
}

#[test]
fn long_needs_cycle_is_reported_short() {
    let Some(r) = measured("long_needs_cycle_is_reported_short", || {
        let n = 10_000;
        let jobs: String = (0..n)
            .map(|i| format!("j{i}: {{script: x, needs: [j{}]}}\n", (i + 1) % n))
            .collect();
        load(".gitlab-ci.yml", &jobs)
    }) else {
        return;
    };
    let e = refused(r, 200, &[".gitlab-ci.yml:", "`needs` form a cycle", "more"]);
    assert!(e.matches(" -> ").count() <= 10, "{e}");
}
