//! The job's context, fixed by `Start` (the image's user, the working
//! directory, default variables), and what each step gets from it: its
//! script, working directory, environment and file-command files.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use kiln_agent::proto::{self, FileCommands, Start, StepSpec};

use super::error::{Error, Result};
use super::sys::{chown_nofollow, set_mode};
use super::{DEFAULT_PATH, NEWROOT, SCRIPT_DIR};
use crate::user::{self, Identity};

/// The job's context, fixed by `Start`.
pub struct Job {
    pub ident: Identity,
    pub workdir: String,
    /// Defaults (`PATH`, `HOME`, `HOSTNAME`) for variables a step leaves unset.
    defaults: Vec<(String, String)>,
}

impl Job {
    /// Resolve the image's user against the image's own files and create
    /// the working directory.
    pub fn prepare(start: &Start) -> Result<Job> {
        let read = |p: &str| std::fs::read_to_string(format!("{NEWROOT}{p}")).unwrap_or_default();
        let ident = user::resolve(&start.user, &read("/etc/passwd"), &read("/etc/group"))
            .map_err(Error::User)?;
        let workdir = if start.workdir.is_empty() {
            "/".to_string()
        } else {
            start.workdir.clone()
        };
        if !workdir.starts_with('/') {
            return Err(Error::RelativeWorkdir(workdir));
        }
        ensure_dir(&workdir, &ident)?;
        let defaults = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), ident.home.clone()),
            ("HOSTNAME".to_string(), "kiln".to_string()),
        ];
        Ok(Job {
            ident,
            workdir,
            defaults,
        })
    }

    /// Write the step's script (inside the job's root) and return `argv`
    /// with `{script}` replaced by its path.
    pub fn write_script(&self, step: &StepSpec) -> Result<Vec<String>> {
        let script_path = format!("{SCRIPT_DIR}/step-{}.sh", step.index);
        let host_script = format!("{NEWROOT}{script_path}");
        std::fs::write(&host_script, &step.script).map_err(|e| Error::StepFile {
            what: format!("cannot write the step's script {script_path}"),
            error: e,
        })?;
        set_mode(&host_script, 0o755)?;
        let argv: Vec<String> = step
            .argv
            .iter()
            .map(|a| a.replace("{script}", &script_path))
            .collect();
        if argv.is_empty() {
            return Err(Error::NoCommand(step.name.clone()));
        }
        Ok(argv)
    }

    /// The step's working directory (relative ones under the job's),
    /// created if missing.
    pub fn step_workdir(&self, step: &StepSpec) -> Result<String> {
        let workdir = match step.workdir.as_str() {
            "" => self.workdir.clone(),
            w if w.starts_with('/') => w.to_string(),
            w => format!("{}/{w}", self.workdir.trim_end_matches('/')),
        };
        if workdir.split('/').any(|c| c == "..") {
            return Err(Error::DotDotWorkdir(workdir));
        }
        ensure_dir(&workdir, &self.ident)?;
        Ok(workdir)
    }

    /// The step's environment: its own, then the defaults for what it leaves unset.
    pub fn step_env(&self, step: &StepSpec, files: Option<&StepFiles>) -> Vec<(String, String)> {
        let mut env = step.env.clone();
        for (k, v) in &self.defaults {
            if !env.iter().any(|(key, _)| key == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        if let Some(f) = files {
            for (k, v) in [
                ("GITHUB_ENV", &f.env),
                ("GITHUB_OUTPUT", &f.output),
                ("GITHUB_PATH", &f.path),
            ] {
                env.retain(|(key, _)| key != k);
                env.push((k.to_string(), v.clone()));
            }
        }
        env
    }
}

/// Create `dir` (inside the job's root) owned by the job's user if missing.
fn ensure_dir(dir: &str, ident: &Identity) -> Result<()> {
    let host = format!("{NEWROOT}{dir}");
    if !Path::new(&host).exists() {
        std::fs::create_dir_all(&host).map_err(|e| Error::CreateWorkdir {
            dir: dir.into(),
            source: e,
        })?;
        chown_nofollow(&host, ident.uid, ident.gid);
    }
    Ok(())
}

/// A step's file-command files (`GITHUB_ENV`, ...), as guest paths.
pub struct StepFiles {
    env: String,
    output: String,
    path: String,
}

impl StepFiles {
    /// Create them, empty and owned by the job's user.
    pub fn create(idx: u32, ident: &Identity) -> Result<StepFiles> {
        let dir = format!("{SCRIPT_DIR}/files-{idx}");
        let host_dir = format!("{NEWROOT}{dir}");
        std::fs::create_dir_all(&host_dir).map_err(|e| Error::StepFile {
            what: format!("create {dir}"),
            error: e,
        })?;
        let files = StepFiles {
            env: format!("{dir}/env"),
            output: format!("{dir}/output"),
            path: format!("{dir}/path"),
        };
        for p in [&dir, &files.env, &files.output, &files.path] {
            let host = format!("{NEWROOT}{p}");
            if p != &dir {
                std::fs::write(&host, b"").map_err(|e| Error::StepFile {
                    what: format!("create {p}"),
                    error: e,
                })?;
            }
            chown_nofollow(&host, ident.uid, ident.gid);
        }
        Ok(files)
    }

    /// What the step wrote to them, each cut at [`proto::MAX_FILE_COMMANDS`].
    pub fn read_back(&self) -> FileCommands {
        let mut truncated = false;
        let env = read_step_file(&self.env, &mut truncated);
        let output = read_step_file(&self.output, &mut truncated);
        let path = read_step_file(&self.path, &mut truncated);
        FileCommands {
            env,
            output,
            path,
            truncated,
        }
    }
}

/// Read a file-command file back, at most `MAX_FILE_COMMANDS` bytes.
fn read_step_file(guest_path: &str, truncated: &mut bool) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(format!("{NEWROOT}{guest_path}")) {
        let _ = f
            .take(proto::MAX_FILE_COMMANDS as u64 + 1)
            .read_to_end(&mut buf);
    }
    if buf.len() > proto::MAX_FILE_COMMANDS {
        buf.truncate(proto::MAX_FILE_COMMANDS);
        *truncated = true;
    }
    String::from_utf8_lossy(&buf).into_owned()
}
