//! Soak (not in CI; `scripts/soak.sh N`): N jobs through the fake GitLab
//! with its faults injected, served by one `kiln daemon` process
//! (`concurrent = 2`, busybox image, tiny scripts). Prints kiln's RSS over
//! time, then the lost / duplicated / inconsistent jobs, the leaked VMs
//! and files, and a one-line summary. Exit status 0 when all are zero.
//!
//! Per job, by its number i: 500 errors before or after handling (5 %
//! each) and a dropped connection every 7th acknowledgement for all; a 202
//! to the first final update of every 2nd job; a 412 for every 3rd; a lost
//! trace tail for every 4th; a 503 to the first artifact upload of every
//! 5th; every 6th job handed out twice; every 7th canceled (gracefully)
//! once it runs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_tests::fake_gitlab::{FakeGitlab, FakeJob, Faults};
use kiln_tests::harness;
use serde_json::json;

const TOKEN: &str = "glrt-soak-runner-token";

/// Resident set size of `pid` in KiB (`VmRSS`), if it still runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Outcome {
    lost: Vec<u64>,
    duplicated: Vec<(u64, String)>,
    inconsistent: Vec<(u64, String)>,
}

/// Sort every job: never finished (lost), run or finalised more than
/// once (duplicated), or otherwise not as GitLab wants it (inconsistent).
fn judge(jobs: &[FakeJob], canceled: &[u64]) -> Outcome {
    let mut o = Outcome {
        lost: Vec::new(),
        duplicated: Vec::new(),
        inconsistent: Vec::new(),
    };
    for j in jobs {
        let want = if canceled.contains(&j.id) {
            "canceled"
        } else {
            "success"
        };
        if !j.done() {
            o.lost.push(j.id);
            continue;
        }
        let accepted = j.finals.iter().filter(|f| f.status == 200).count();
        let outcomes: std::collections::BTreeSet<String> = j
            .finals
            .iter()
            .map(|f| {
                format!(
                    "{} {} {}",
                    f.body["state"], f.body["failure_reason"], f.body["exit_code"]
                )
            })
            .collect();
        if j.runs > 1 || accepted > 1 || outcomes.len() > 1 {
            o.duplicated.push((
                j.id,
                format!(
                    "run {} times, {accepted} accepted final updates, outcomes {outcomes:?}",
                    j.runs
                ),
            ));
            continue;
        }
        match j.check_consistent() {
            Err(e) => o.inconsistent.push((j.id, e)),
            Ok(()) if j.status != want => o
                .inconsistent
                .push((j.id, format!("ended {} instead of {want}", j.status))),
            Ok(()) => {}
        }
    }
    o
}

fn config(fake: &FakeGitlab, dir: &Path, run_dir: &Path) -> PathBuf {
    let text = format!(
        r#"
concurrent = 2
check_interval = 1
shutdown_timeout = 30
boot_timeout = 120
run_dir = {run_dir:?}
agent = {agent:?}
log_dir = {logs:?}

[[runners]]
name = "soak"
url = "{url}"
token = "{TOKEN}"
cpus = 1
memory = 256
disk = 1
cache_dir = {cache:?}
allow_local_images = true
"#,
        run_dir = run_dir.display().to_string(),
        agent = harness::agent().display().to_string(),
        logs = dir.join("logs").display().to_string(),
        url = fake.url,
        cache = harness::cache_dir().display().to_string(),
    );
    let p = dir.join("kiln.toml");
    std::fs::write(&p, text).expect("write the soak config");
    p
}

fn main() -> ExitCode {
    let n: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 10,
        Some(Ok(n)) if n > 0 => n,
        _ => {
            eprintln!("usage: soak [N]   (N jobs, default 10)");
            return ExitCode::from(2);
        }
    };
    if let Some(why) = harness::vm_skip_reason() {
        eprintln!("soak: cannot run VMs here: {why}");
        return ExitCode::from(2);
    }
    harness::kernel();
    let image = harness::busybox_image();
    let bin = harness::kiln_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = harness::run_dir("soak");
    let fake = FakeGitlab::start(TOKEN, &[("README", "soak\n")]);
    let cfg = config(&fake, dir.path(), &run_dir);

    let mut ids = Vec::new();
    let mut to_cancel = Vec::new();
    for i in 1..=n {
        fake.set_faults(Faults {
            error_before: 0.05,
            error_after: 0.05,
            drop_every: 7,
            final_202: u32::from(i % 2 == 0),
            final_412: i % 3 == 0,
            trace_lose_tail: i % 4 == 0,
            duplicate_every: 6,
            upload_answers: if i % 5 == 0 { vec![503] } else { Vec::new() },
            ..Faults::default()
        });
        let cancel = i % 7 == 0;
        let script = if cancel {
            "while true; do echo tick; sleep 1; done".to_string()
        } else {
            format!(
                "echo job {i}; i=0; while [ $i -lt 200 ]; do echo \"tick $i\"; i=$((i+1)); done; mkdir -p out; echo {i} > out/n"
            )
        };
        let mut job = fake.job(&image.display().to_string(), &[&script]);
        job["steps"].as_array_mut().unwrap().push(json!(
            {"name": "after_script", "script": ["echo after"], "timeout": 60, "when": "always", "allow_failure": true}
        ));
        job["artifacts"] = json!([{"name": "out", "paths": ["out/"], "when": "on_success",
            "artifact_type": "archive", "artifact_format": "zip"}]);
        let id = fake.push(job);
        ids.push(id);
        if cancel {
            to_cancel.push(id);
        }
    }

    let log_path = dir.path().join("kiln.log");
    let log = std::fs::File::create(&log_path).expect("kiln log");
    let mut child = Command::new(&bin)
        .args(["--log-level", "info", "daemon", "--config"])
        .arg(&cfg)
        .env("HOME", dir.path())
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("DOCKER_CONFIG", dir.path().join("docker"))
        .env("KILN_REGISTRY_CONFIG", dir.path().join("registry.json"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kiln daemon");
    let pid = child.id();
    println!(
        "soak: {n} jobs, kiln daemon pid {pid}, log {}",
        log_path.display()
    );

    // RSS, sampled every second.
    let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let sampler = {
        let (samples, sampling) = (samples.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                if let Some(kib) = rss_kib(pid) {
                    samples
                        .lock()
                        .unwrap()
                        .push((t0.elapsed().as_secs_f64(), kib));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let deadline = Duration::from_secs(120 + 60 * n as u64);
    let mut canceled = Vec::new();
    let mut last_print = Instant::now();
    let mut max_vms = 0;
    // RSS figures count from the daemon's start (its token check).
    let mut started = None;
    loop {
        if started.is_none() && fake.verifies() > 0 {
            started = Some(t0.elapsed().as_secs_f64());
        }
        let jobs = fake.jobs();
        for j in &jobs {
            if to_cancel.contains(&j.id)
                && !canceled.contains(&j.id)
                && j.status == "running"
                && j.trace_text().contains("tick\n")
            {
                fake.set_status(j.id, "canceling");
                canceled.push(j.id);
            }
        }
        let done = jobs.iter().filter(|j| j.done()).count();
        max_vms = max_vms.max(harness::qemu_processes_under(&run_dir).len());
        if last_print.elapsed() >= Duration::from_secs(10) || done == n {
            let rss = samples.lock().unwrap().last().map(|s| s.1).unwrap_or(0);
            println!(
                "t={:>5.0}s  done {done:>4}/{n}  kiln RSS {:>7.1} MiB  VMs {}",
                t0.elapsed().as_secs_f64(),
                mib(rss),
                harness::qemu_processes_under(&run_dir).len()
            );
            last_print = Instant::now();
        }
        if done == n {
            break;
        }
        if t0.elapsed() > deadline {
            println!("soak: deadline of {deadline:?} reached with {done}/{n} jobs done");
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            println!("soak: kiln exited early: {st}");
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = t0.elapsed();

    // SAFETY: kill(2) with plain integers, on our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for kiln");
    sampling.store(false, Ordering::SeqCst);
    let _ = sampler.join();
    // QEMU dies with kiln (PDEATHSIG); give a killed one a moment.
    let t1 = Instant::now();
    while !harness::qemu_processes_under(&run_dir).is_empty()
        && t1.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let leaked_vms = harness::qemu_processes_under(&run_dir).len();
    let leaked_files: Vec<PathBuf> = std::fs::read_dir(&run_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();

    let jobs = fake.jobs();
    let o = judge(&jobs, &canceled);
    for id in &o.lost {
        println!("lost: job {id}");
    }
    for (id, e) in o.duplicated.iter().chain(&o.inconsistent) {
        println!("job {id}: {}", e.chars().take(400).collect::<String>());
    }
    for p in &leaked_files {
        println!("leaked file: {}", p.display());
    }
    let from = started.unwrap_or(0.0);
    let samples: Vec<(f64, u64)> = samples
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|s| s.0 >= from)
        .collect();
    println!("kiln RSS over time (MiB):");
    let step = (samples.len() / 20).max(1);
    for (t, kib) in samples.iter().step_by(step) {
        println!("  t={t:>6.0}s  {:>7.1}", mib(*kib));
    }
    let first = samples.first().map(|s| s.1).unwrap_or(0);
    let last = samples.last().map(|s| s.1).unwrap_or(0);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let handed_twice = jobs.iter().filter(|j| j.assigned > 1).count();
    println!(
        "faults seen: {} dropped connections, {handed_twice} jobs handed out twice, {} canceled, \
         {} range resyncs, at most {max_vms} VMs at once; kiln exited with {status}",
        fake.drops(),
        canceled.len(),
        jobs.iter().map(|j| j.range_errors).sum::<u32>(),
    );
    let bad =
        o.lost.len() + o.duplicated.len() + o.inconsistent.len() + leaked_vms + leaked_files.len();
    println!(
        "soak: {n} jobs in {:.0} s: lost {}, duplicated {}, inconsistent {}, leaked VMs {leaked_vms}, \
         leaked files {}; kiln RSS {:.1} MiB after start, {:.1} MiB at the end, {:.1} MiB peak",
        elapsed.as_secs_f64(),
        o.lost.len(),
        o.duplicated.len(),
        o.inconsistent.len(),
        leaked_files.len(),
        mib(first),
        mib(last),
        mib(peak),
    );
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&image);
    if bad == 0 && status.success() {
        ExitCode::SUCCESS
    } else {
        println!("soak: kiln's log: {}", log_path.display());
        // Keep the log for a look.
        let _ = dir.keep();
        ExitCode::FAILURE
    }
}
