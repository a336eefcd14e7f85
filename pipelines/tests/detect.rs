mod common;

use std::path::Path;

use common::*;
use kiln_pipelines::{detect, list_jobs, Format, JobWhen, Options};

#[test]
fn detects_by_path_then_content() {
    assert_eq!(detect(Path::new("repo/.gitlab-ci.yml"), ""), Format::GitLab);
    assert_eq!(
        detect(Path::new(".github/workflows/ci.yaml"), ""),
        Format::GitHub
    );
    assert_eq!(
        detect(
            Path::new("ci.yml"),
            "on: push\njobs:\n  a:\n    runs-on: x\n"
        ),
        Format::GitHub
    );
    assert_eq!(detect(Path::new("ci.yml"), "stages: [a]\n"), Format::GitLab);
    assert_eq!(
        detect(Path::new("ci.yml"), "build:\n  script: make\n"),
        Format::GitLab
    );
    assert_eq!(detect(Path::new("ci.yml"), "foo: bar\n"), Format::Unknown);
    assert_eq!(detect(Path::new("ci.yml"), ": : :\n\t"), Format::Unknown);
}

#[test]
fn every_corpus_file_loads_through_the_common_entry_point() {
    let mut count = 0;
    let c = ctx("gitlab", Some("main"));
    let read = |p: &str| std::fs::read_to_string(corpus("gitlab-include").join(p));
    for dir in ["gitlab", "github/.github/workflows"] {
        for f in std::fs::read_dir(corpus(dir)).unwrap() {
            let path = f.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let p = kiln_pipelines::load(&path, &text, &c, &Options::default(), &read)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!p.jobs.is_empty(), "{}", path.display());
            count += 1;
        }
    }
    assert!(count >= 19, "{count}");
    let main = corpus("gitlab-include/.gitlab-ci.yml");
    let text = std::fs::read_to_string(&main).unwrap();
    let jobs = list_jobs(&main, &text, &c, &Options::default(), &read).unwrap();
    let summary: Vec<(&str, Option<&str>, JobWhen)> = jobs
        .iter()
        .map(|j| (j.name.as_str(), j.stage.as_deref(), j.when))
        .collect();
    assert_eq!(
        summary,
        [
            ("lint", Some("test"), JobWhen::OnSuccess),
            ("unit", Some("test"), JobWhen::OnSuccess),
            ("deploy", Some("deploy"), JobWhen::Manual)
        ]
    );
}
