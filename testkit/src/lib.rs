//! kiln's test harness.
//!
//! A test that cannot run here (no QEMU, not root, a tool missing) must not
//! read `ok`. Integration test targets are built with `harness = false` and
//! list their tests in a [`Suite`]: a test whose [`Need`]s are not met is
//! reported by the runner as `ignored`, with the reason printed once at the
//! start — unless the environment *requires* that need, in which case the
//! test fails with the reason. CI sets `KILN_TEST_REQUIRE=all,-hardware-kvm,-unprivileged-kvm`
//! so that a missing prerequisite fails the run loudly.
//!
//! `KILN_TEST_REQUIRE` is a comma list of need names (`qemu`, `root`,
//! `umoci`, ...), `all`, and `-name` exclusions. Unit tests inside library
//! crates (plain libtest) call [`require`], which fails where the need is
//! required and otherwise prints why it returns early.

use std::collections::HashMap;
use std::future::Future;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use libtest_mimic::{Arguments, Failed, Trial};

pub mod fuzz;
pub mod moto;

/// Something a test needs from the host.
#[derive(Clone)]
pub struct Need {
    name: &'static str,
    check: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

impl Need {
    /// A need checked by `check`, which says why it is not met.
    pub fn custom(
        name: &'static str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Need {
        Need {
            name,
            check: Arc::new(check),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the need is met here; checked once per process and name.
    pub fn unmet(&self) -> Option<String> {
        static SEEN: OnceLock<Mutex<HashMap<&'static str, Option<String>>>> = OnceLock::new();
        let seen = SEEN.get_or_init(Default::default);
        if let Some(r) = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(self.name)
        {
            return r.clone();
        }
        let r = (self.check)().err();
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.name, r.clone());
        r
    }
}

/// A program on `PATH`, from the Debian package `package`.
pub fn tool(bin: &'static str, package: &'static str) -> Need {
    program(bin, format!("apt-get install {package}"))
}

/// A program on `PATH`, from the PyPI package `package` (installed by
/// scripts/setup.sh with pip).
pub fn pip_tool(bin: &'static str, package: &'static str) -> Need {
    program(bin, format!("pip install '{package}'"))
}

/// `bin` on `PATH`, which `install` installs.
fn program(bin: &'static str, install: String) -> Need {
    Need::custom(bin, move || {
        if on_path(bin) {
            Ok(())
        } else {
            Err(format!(
                "{bin} is not installed ({install}, or run scripts/setup.sh)"
            ))
        }
    })
}

/// Running as root (owners, device nodes, mounts).
pub fn root() -> Need {
    Need::custom("root", || {
        if rustix::process::geteuid().is_root() {
            Ok(())
        } else {
            Err("needs root (sets file owners / makes device nodes)".into())
        }
    })
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether `KILN_TEST_REQUIRE` makes the need named `name` mandatory.
pub fn required(name: &str) -> bool {
    let Ok(spec) = std::env::var("KILN_TEST_REQUIRE") else {
        return false;
    };
    let mut req = false;
    for item in spec.split(',').map(str::trim) {
        if item == "all" || item == name {
            req = true;
        }
    }
    for item in spec.split(',').map(str::trim) {
        if item.strip_prefix('-') == Some(name) {
            req = false;
        }
    }
    req
}

/// For unit tests under libtest: `true` when every need is met. Otherwise
/// panics if one is required, or prints why and returns `false` (the caller
/// returns early).
pub fn require(test: &str, needs: &[Need]) -> bool {
    for n in needs {
        if let Some(why) = n.unmet() {
            if required(n.name) {
                panic!(
                    "{test}: required prerequisite `{}` is missing: {why} (KILN_TEST_REQUIRE)",
                    n.name
                );
            }
            eprintln!("SKIPPED {test}: {why}");
            return false;
        }
    }
    true
}

type Cleanup = Box<dyn FnOnce() + Send>;

fn cleanups() -> &'static Mutex<Vec<Cleanup>> {
    static C: OnceLock<Mutex<Vec<Cleanup>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// Runs `f` when the suite has finished (e.g. removes a fixture that the
/// tests of this process shared).
pub fn at_exit(f: impl FnOnce() + Send + 'static) {
    cleanups()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(f));
}

/// An error and its sources on one line, `: `-separated (as `anyhow`
/// prints them with `{:#}`), for tests that check what an error says.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The tests of one integration-test target.
#[derive(Default)]
pub struct Suite {
    trials: Vec<Trial>,
    skipped: Vec<(String, String)>,
}

impl Suite {
    pub fn new() -> Suite {
        Suite::default()
    }

    /// A plain test.
    pub fn test(&mut self, name: &str, needs: &[Need], f: fn()) -> &mut Suite {
        self.add(name, needs, f)
    }

    /// An async test, run on a multi-threaded tokio runtime of its own.
    pub fn tokio<Fut>(&mut self, name: &str, needs: &[Need], f: fn() -> Fut) -> &mut Suite
    where
        Fut: Future<Output = ()> + 'static,
    {
        self.add(name, needs, move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .expect("build a tokio runtime")
                .block_on(f())
        })
    }

    fn add(
        &mut self,
        name: &str,
        needs: &[Need],
        body: impl FnOnce() + Send + 'static,
    ) -> &mut Suite {
        let mut missing: Option<(&'static str, String)> = None;
        for n in needs {
            if let Some(why) = n.unmet() {
                missing = Some((n.name, why));
                break;
            }
        }
        let trial = match missing {
            None => Trial::test(name, move || {
                body();
                Ok(())
            }),
            Some((need, why)) if required(need) => {
                let msg = format!(
                    "required prerequisite `{need}` is missing: {why} \
                     (KILN_TEST_REQUIRE={})",
                    std::env::var("KILN_TEST_REQUIRE").unwrap_or_default()
                );
                Trial::test(name, move || Err(Failed::from(msg)))
            }
            Some((need, why)) => {
                self.skipped.push((name.to_string(), why.clone()));
                // Run anyway (`--include-ignored`), it fails with the reason.
                let msg = format!("prerequisite `{need}` is missing: {why}");
                Trial::test(name, move || Err(Failed::from(msg))).with_ignored_flag(true)
            }
        };
        self.trials.push(trial);
        self
    }

    /// Runs the selected tests the way libtest does and returns its status.
    pub fn run(&mut self) -> ExitCode {
        let args = Arguments::from_args();
        if !args.list && !self.skipped.is_empty() {
            let filter = args.filter.clone().unwrap_or_default();
            for (name, why) in &self.skipped {
                if name.contains(&filter) {
                    eprintln!("skipped {name}: {why}");
                }
            }
        }
        let conclusion = libtest_mimic::run(&args, std::mem::take(&mut self.trials));
        let hooks = std::mem::take(&mut *cleanups().lock().unwrap_or_else(|e| e.into_inner()));
        for f in hooks.into_iter().rev() {
            f();
        }
        conclusion.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The only test that touches KILN_TEST_REQUIRE, so no other test races it.
    #[test]
    fn require_lists_all_and_exclusions() {
        let cases = [
            (None, "qemu", false),
            (Some("qemu,root"), "qemu", true),
            (Some("qemu,root"), "umoci", false),
            (Some("all"), "umoci", true),
            (Some("all,-hardware-kvm"), "hardware-kvm", false),
            (Some("all, -hardware-kvm"), "qemu", true),
            (Some("-qemu,all"), "qemu", false),
        ];
        for (env, name, want) in cases {
            match env {
                Some(v) => std::env::set_var("KILN_TEST_REQUIRE", v),
                None => std::env::remove_var("KILN_TEST_REQUIRE"),
            }
            assert_eq!(required(name), want, "{env:?} {name}");
        }
        std::env::set_var("KILN_TEST_REQUIRE", "all");
        let missing = Need::custom("never-here", || Err("absent on purpose".into()));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            require("t", std::slice::from_ref(&missing))
        }));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(
            msg.contains("never-here") && msg.contains("absent on purpose"),
            "{msg}"
        );
        std::env::set_var("KILN_TEST_REQUIRE", "all,-never-here");
        assert!(!require("t", &[missing]));
        assert!(require("t", &[Need::custom("here", || Ok(()))]));
        std::env::remove_var("KILN_TEST_REQUIRE");
    }
}
