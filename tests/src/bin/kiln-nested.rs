//! Run a program inside an L1 VM that has real KVM (QEMU TCG emulating
//! AMD-V), streaming its output and returning its exit status. See
//! `kiln_tests::nested` and `scripts/nested-kvm.sh`.
//!
//! ```text
//! kiln-nested [--memory MIB] [--vcpus N] [--timeout SECS]
//!             [--include PATH]... [--env KEY=VALUE]... -- PROGRAM [ARGS...]
//! ```
//!
//! Inside L1 the program finds `KILN_AGENT` (the guest agent),
//! `KILN_TEST_ROOT` and `KILN_CACHE_DIR` (a writable test root holding the
//! cached guest kernel) and `KILN_NESTED_L1=1`. Exit status: the program's;
//! 77 when this host cannot run L1 or L1 has no `/dev/kvm` (said why on
//! stderr); 125 when the tier itself failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_tests::nested::{self, Outcome, Payload};

const USAGE: &str = "usage: kiln-nested [--memory MIB] [--vcpus N] [--timeout SECS] \
                     [--include PATH]... [--env KEY=VALUE]... -- PROGRAM [ARGS...]";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln-nested: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args().skip(1);
    let mut memory = None;
    let mut vcpus = None;
    let mut timeout = None;
    let mut payload = Payload::default();
    let value = |args: &mut dyn Iterator<Item = String>, what: &str| {
        args.next()
            .ok_or_else(|| anyhow::anyhow!("{what} needs a value\n{USAGE}"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--" => {
                payload.argv = args.by_ref().collect();
                break;
            }
            "--memory" => memory = Some(value(&mut args, "--memory")?.parse()?),
            "--vcpus" => vcpus = Some(value(&mut args, "--vcpus")?.parse()?),
            "--timeout" => timeout = Some(value(&mut args, "--timeout")?.parse::<u64>()?),
            "--include" => payload.include.push(value(&mut args, "--include")?.into()),
            "--env" => {
                let kv = value(&mut args, "--env")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--env wants KEY=VALUE, not {kv}"))?;
                payload.env.push((k.into(), v.into()));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if payload.argv.is_empty() {
        anyhow::bail!("no program given\n{USAGE}");
    }
    if let Some(why) = nested::skip_reason() {
        eprintln!("kiln-nested: cannot run L1 here: {why}");
        return Ok(ExitCode::from(77));
    }
    let mut cfg = nested::default_config()?;
    if let Some(m) = memory {
        cfg.memory_mib = m;
    }
    if let Some(v) = vcpus {
        cfg.vcpus = v;
    }
    if let Some(t) = timeout {
        cfg.timeout = Duration::from_secs(t);
    }
    let agent = kiln_tests::harness::agent();
    payload.include.push(agent.clone());
    payload.cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    payload.env.extend(nested::l1_env(&agent));
    eprintln!(
        "kiln-nested: booting L1 (QEMU TCG, -cpu max, {} MiB, {} vCPU) to run {:?}",
        cfg.memory_mib, cfg.vcpus, payload.argv
    );
    let report = nested::run(&cfg, &payload, &mut |l| println!("{l}"))?;
    eprintln!("kiln-nested: {}", report.timing());
    Ok(match report.outcome {
        Outcome::Exited(c) => {
            eprintln!("kiln-nested: the program exited with status {c}");
            ExitCode::from(u8::try_from(c).unwrap_or(1))
        }
        Outcome::NoKvm(why) => {
            eprintln!("kiln-nested: L1 booted but has no /dev/kvm:\n{why}");
            ExitCode::from(77)
        }
    })
}
