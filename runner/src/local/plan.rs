//! What `run-job` runs: the context from git, the pipeline file, the jobs
//! asked for with their `needs`, and the ad-hoc job of `--image`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_pipelines::{JobSpec, LocalContext, Options, Pipeline, Shell, Step, Variable};

use super::Args;

/// Facts about the checkout around `file`, read from git.
pub fn local_context(file: &Path, extra_vars: Vec<(String, String)>) -> Result<LocalContext> {
    let file_dir = file
        .canonicalize()
        .with_context(|| format!("cannot open {}", file.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let git = |args: &[&str]| -> Option<String> {
        let o = Command::new("git")
            .args(args)
            .current_dir(&file_dir)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let project_dir = git(&["rev-parse", "--show-toplevel"])
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Not a git checkout: the file's directory (or the one above `.github/workflows`).
            let mut d = file_dir.clone();
            if d.ends_with(".github/workflows") {
                d.pop();
                d.pop();
            }
            d
        });
    let name = project_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "project".into());
    let mut ctx = LocalContext::new(project_dir, name);
    ctx.commit_sha = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    ctx.branch = git(&["symbolic-ref", "--short", "-q", "HEAD"]).filter(|b| !b.is_empty());
    ctx.extra_vars = extra_vars;
    crate::checkout::fill(&mut ctx);
    Ok(ctx)
}

/// Parse `file` (format detected). The file and its includes are read with
/// the size limit of `opts.limits`; includes only from inside the project.
pub fn load_pipeline(file: &Path, ctx: &LocalContext, opts: &Options) -> Result<Pipeline> {
    let contents = kiln_pipelines::read_file(file, opts.limits.max_file_bytes)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let files = kiln_pipelines::ProjectFiles::new(&ctx.project_dir, &opts.limits);
    Ok(kiln_pipelines::load(file, &contents, ctx, opts, &|rel| {
        files.read(rel)
    })?)
}

/// The jobs to run for `name`: every job called `name` (or expanded from the
/// job key `name` by a matrix), filtered by `matrix` (`key=value` pairs,
/// matched against the job's variables or its name), with their `needs`
/// first, in dependency order.
pub fn select_jobs<'a>(
    pipeline: &'a Pipeline,
    name: &str,
    matrix: &[(String, String)],
) -> Result<Vec<&'a JobSpec>> {
    let matches_matrix = |j: &JobSpec| {
        matrix.iter().all(|(k, v)| {
            j.variables
                .iter()
                .any(|var| &var.key == k && &var.value == v)
                || j.name.contains(v.as_str())
        })
    };
    let targets: Vec<&JobSpec> = pipeline
        .jobs
        .iter()
        .filter(|j| (j.name == name || j.id == name) && matches_matrix(j))
        .collect();
    // GitHub: a job that calls a reusable workflow selects the jobs it called.
    let github = pipeline.format == kiln_pipelines::Format::GitHub;
    let targets = if targets.is_empty() && github {
        pipeline
            .jobs
            .iter()
            .filter(|j| j.stage.as_deref() == Some(name) && matches_matrix(j))
            .collect()
    } else {
        targets
    };
    if targets.is_empty() {
        const SHOWN: usize = 20;
        let mut names: Vec<String> = pipeline
            .jobs
            .iter()
            .take(SHOWN)
            .map(|j| j.name.chars().take(80).collect())
            .collect();
        if pipeline.jobs.len() > SHOWN {
            names.push(format!(
                "and {} more (see --list)",
                pipeline.jobs.len() - SHOWN
            ));
        }
        let shown: String = name.chars().take(80).collect();
        bail!(
            "no job '{}'{} in the pipeline; jobs: {}",
            shown.escape_debug(),
            if matrix.is_empty() {
                ""
            } else {
                " matching --matrix"
            },
            names.join(", ")
        );
    }
    // Dependencies first, in O(jobs + needs); cycles were rejected by the parser.
    let index: HashMap<&str, usize> = pipeline
        .jobs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let mut order: Vec<&JobSpec> = Vec::new();
    let mut state = vec![0u8; pipeline.jobs.len()]; // 0 new, 1 open, 2 done
    for t in targets {
        let Some(&start) = index.get(t.name.as_str()) else {
            continue;
        };
        let mut stack: Vec<(usize, usize)> = Vec::new();
        if state[start] == 0 {
            state[start] = 1;
            stack.push((start, 0));
        }
        while let Some(&mut (i, ref mut next)) = stack.last_mut() {
            let job = &pipeline.jobs[i];
            let Some(n) = job.needs.as_deref().unwrap_or_default().get(*next) else {
                state[i] = 2;
                order.push(job);
                stack.pop();
                continue;
            };
            *next += 1;
            let &d = index.get(n.as_str()).with_context(|| {
                let why = pipeline
                    .excluded
                    .iter()
                    .find(|e| &e.name == n)
                    .map(|e| format!(": {}", e.reason.chars().take(300).collect::<String>()))
                    .unwrap_or_default();
                format!(
                    "job '{}' needs '{}', which is not in the pipeline{why}",
                    job.name.chars().take(80).collect::<String>(),
                    n.chars().take(80).collect::<String>()
                )
            })?;
            if state[d] == 0 {
                state[d] = 1;
                stack.push((d, 0));
            }
        }
    }
    Ok(order)
}

/// The jobs to run, in order, and the checkout they run on.
pub struct Plan {
    pub jobs: Vec<JobSpec>,
    /// The pipeline file's project; none for an ad-hoc job (`--image`).
    pub project_dir: Option<PathBuf>,
    /// A GitHub workflow: jobs go on after a failure, each decided by its
    /// `if:` ([`kiln_pipelines::github::job_should_run`]).
    pub github: bool,
    /// GitHub: the contexts of each run-time job `if:` (job name to them).
    pub conditions: std::collections::BTreeMap<String, kiln_pipelines::github::Contexts>,
    /// GitHub: reusable-workflow calls to their `on.workflow_call.outputs`.
    pub call_outputs: std::collections::BTreeMap<String, Vec<(String, String)>>,
}

pub(super) fn key_values(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} '{kv}' is not KEY=VALUE"))
        })
        .collect()
}

/// The pipeline file of the project in `dir`, as act and gitlab-ci-local
/// find it: `.gitlab-ci.yml`, else the only workflow in `.github/workflows`
/// (several: none, the user names one).
pub fn default_pipeline(dir: &Path) -> Option<PathBuf> {
    let gitlab = dir.join(".gitlab-ci.yml");
    if gitlab.is_file() {
        return Some(gitlab);
    }
    let mut workflows = std::fs::read_dir(dir.join(".github/workflows"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yml" || x == "yaml"));
    let only = workflows.next()?;
    workflows.next().is_none().then_some(only)
}

/// FILE and JOB as given, or completed from the project in `dir`:
/// `kiln run-job --list` and `kiln run-job JOB` read its default pipeline
/// file ([`default_pipeline`]) when no FILE is given (and no `--image`
/// makes it an ad-hoc job). A first argument that names an existing path,
/// or looks like one (a `/` or a `.yml`/`.yaml` end), stays the FILE.
pub fn pipeline_target(args: &Args, dir: &Path) -> Result<(Option<PathBuf>, Option<String>)> {
    let looks_like_a_path = |p: &Path| {
        dir.join(p).exists()
            || p.components().count() > 1
            || p.extension().is_some_and(|x| x == "yml" || x == "yaml")
    };
    let adhoc = args.image.is_some() || !args.command.is_empty() || args.script.is_some();
    let found = || {
        default_pipeline(dir).with_context(|| {
            let mut names: Vec<String> = std::fs::read_dir(dir.join(".github/workflows"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yml") || n.ends_with(".yaml"))
                .collect();
            names.sort();
            if names.len() > 1 {
                format!(
                    "{} workflows in {}: name one as FILE ({})",
                    names.len(),
                    dir.join(".github/workflows").display(),
                    names.join(", ")
                )
            } else {
                format!(
                    "no .gitlab-ci.yml or workflow in .github/workflows in {}",
                    dir.display()
                )
            }
        })
    };
    match (&args.file, &args.job) {
        (Some(f), job) if job.is_some() || looks_like_a_path(f) => {
            Ok((Some(f.clone()), job.clone()))
        }
        (Some(name), _) => {
            let file = found().with_context(|| {
                format!(
                    "{} is neither a pipeline file nor, without one, a job",
                    name.display()
                )
            })?;
            Ok((Some(file), Some(name.to_string_lossy().into_owned())))
        }
        (None, _) if args.list => Ok((Some(found().context("--list without FILE")?), None)),
        (None, _) if adhoc => Ok((None, None)),
        (None, _) => Ok((default_pipeline(dir), None)),
    }
}

/// The jobs `run-job` was asked for: one ad-hoc job, or jobs from a file
/// (none when it only lists them).
pub fn plan_jobs(args: &Args) -> Result<Option<Plan>> {
    let vars = key_values(&args.vars, "--var")?;
    let secrets = key_values(&args.secrets, "--secret")?;
    let here = std::env::current_dir().context("reading the current directory")?;
    let (file, job) = pipeline_target(args, &here)?;
    let Some(file) = &file else {
        let Some(image) = &args.image else {
            bail!("give a pipeline FILE and JOB, or --image with a command after `--` or --script");
        };
        let step = match (&args.script, args.command.is_empty()) {
            (Some(path), _) => {
                let body = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the script {}", path.display()))?;
                let mut s = Step::script(path.display().to_string(), body);
                s.shell = match args.shell.as_str() {
                    "sh" => Shell::Sh,
                    "bash" => Shell::Bash,
                    other => bail!("unknown --shell '{other}' (expected sh or bash)"),
                };
                s
            }
            (None, false) => {
                let mut s = Step::script(args.command.join(" "), String::new());
                s.shell = Shell::Exec(args.command.clone());
                s
            }
            (None, true) => bail!("nothing to run: give a command after `--` or --script FILE"),
        };
        let mut job = JobSpec::single("run-job", image.clone(), step);
        job.timeout = Some(Duration::from_secs(args.timeout));
        job.working_dir = args.workdir.clone();
        for (k, v) in vars {
            job.variables.push(Variable::new(k, v));
        }
        for (k, v) in secrets {
            job.variables.push(Variable {
                masked: true,
                ..Variable::new(k, v)
            });
        }
        return Ok(Some(Plan {
            jobs: vec![job],
            project_dir: None,
            github: false,
            conditions: Default::default(),
            call_outputs: Default::default(),
        }));
    };
    let mut all_vars = vars.clone();
    all_vars.extend(secrets.iter().cloned());
    let mut ctx = local_context(file, all_vars)?;
    ctx.secrets = secrets.clone();
    let mut opts = kiln_pipelines::Options::default();
    for (label, image) in key_values(&args.platforms, "--platform")? {
        opts.runner_images.set(label, image);
    }
    args.pipeline.apply(&mut ctx, &mut opts, job.as_deref())?;
    opts.image = args.image.clone();
    let pipeline = load_pipeline(file, &ctx, &opts)?;
    for n in &pipeline.notes {
        eprintln!("kiln: note: {n}");
    }
    if args.list {
        args.pipeline.list(&pipeline, args.json)?;
        return Ok(None);
    }
    let Some(name) = &job else {
        bail!("which job? give its name after the file (list them with --list)");
    };
    let matrix = key_values(&args.matrix, "--matrix")?;
    let mut jobs: Vec<JobSpec> = select_jobs(&pipeline, name, &matrix)?
        .into_iter()
        .cloned()
        .collect();
    for job in &mut jobs {
        if let Some(image) = &args.image {
            job.image = image.clone();
        }
        for v in &mut job.variables {
            if secrets.iter().any(|(k, _)| k == &v.key) {
                v.masked = true;
            }
        }
        if job.timeout.is_none() {
            job.timeout = Some(Duration::from_secs(args.timeout));
        }
    }
    Ok(Some(Plan {
        jobs,
        project_dir: Some(ctx.project_dir),
        github: pipeline.format == kiln_pipelines::Format::GitHub,
        conditions: pipeline.conditions,
        call_outputs: pipeline.call_outputs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn target(dir: &Path, argv: &[&str]) -> Result<(Option<PathBuf>, Option<String>)> {
        let cli = Cli::try_parse_from(std::iter::once("run-job").chain(argv.iter().copied()))?;
        pipeline_target(&cli.args, dir)
    }

    #[test]
    fn a_missing_file_is_found_in_the_project_and_a_bare_name_is_a_job() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        // Nothing to find: only an ad-hoc job or an explicit file works.
        let e = target(dir, &["--list"]).unwrap_err();
        assert!(format!("{e:#}").contains(".gitlab-ci.yml"), "{e:#}");
        assert!(target(dir, &["build"]).is_err());
        assert_eq!(target(dir, &[]).unwrap(), (None, None));

        // Two workflows: which one is the user's to say.
        let wf = dir.join(".github/workflows");
        std::fs::create_dir_all(&wf).unwrap();
        std::fs::write(wf.join("ci.yml"), "on: push\n").unwrap();
        std::fs::write(wf.join("release.yaml"), "on: push\n").unwrap();
        let e = target(dir, &["--list"]).unwrap_err();
        assert!(format!("{e:#}").contains("ci.yml, release.yaml"), "{e:#}");
        std::fs::remove_file(wf.join("release.yaml")).unwrap();
        assert_eq!(
            target(dir, &["--list"]).unwrap(),
            (Some(wf.join("ci.yml")), None)
        );

        // .gitlab-ci.yml wins; a bare name is then its job.
        let gl = dir.join(".gitlab-ci.yml");
        std::fs::write(&gl, "build:\n  script: [true]\n").unwrap();
        assert_eq!(
            target(dir, &["build"]).unwrap(),
            (Some(gl.clone()), Some("build".into()))
        );
        assert_eq!(
            target(dir, &["build", "--image", "alpine"]).unwrap(),
            (Some(gl.clone()), Some("build".into())),
            "--image with a job name overrides the job's image"
        );
        // What names a path stays the file, existing or not.
        for f in ["other.yml", "ci/x", "x.yaml"] {
            assert_eq!(target(dir, &[f]).unwrap(), (Some(f.into()), None), "{f}");
        }
        assert_eq!(
            target(dir, &["f", "job"]).unwrap(),
            (Some("f".into()), Some("job".into()))
        );
        // An ad-hoc job never reads the project's file.
        assert_eq!(
            target(dir, &["--image", "alpine", "--", "true"]).unwrap(),
            (None, None)
        );
        assert_eq!(target(dir, &[]).unwrap(), (Some(gl), None));
    }
}
