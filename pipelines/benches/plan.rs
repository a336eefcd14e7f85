//! Parsing and planning large `.gitlab-ci.yml` files: 4,500 jobs against
//! 45,000 jobs in the same run. Linear work gives a ratio near 10 for both
//! parse and plan (the old planner was cubic: 2,000 jobs took 25 s).
//!
//! `cargo bench -p kiln-pipelines --bench plan`

use std::io;
use std::time::{Duration, Instant};

use kiln_pipelines::{gitlab, LocalContext, Options};

#[path = "../tests/common/many_jobs.rs"]
mod many_jobs;
use many_jobs::many_jobs;

/// Best of three (YAML alone, parse, plan) times.
fn measure(n: usize) -> (Duration, Duration, Duration) {
    let text = many_jobs(n);
    let ctx = LocalContext::new("/nonexistent", "bench");
    let read = |_: &str| -> io::Result<String> { Err(io::ErrorKind::NotFound.into()) };
    let target = (0..n)
        .rev()
        .find(|i| i % 3 == 2 && i % 10 != 9)
        .map(|i| format!("j{i}"))
        .unwrap_or_default();
    let mut best = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
        drop(v);
        let yaml = t.elapsed();
        let t = Instant::now();
        let p = gitlab::parse(".gitlab-ci.yml", &text, &ctx, &Options::default(), &read)
            .expect("the generated pipeline parses");
        let parsed = t.elapsed();
        let t = Instant::now();
        let order = p.run_order(&target).expect("the target exists");
        let planned = t.elapsed();
        assert_eq!(order.len(), 1 + (0..n).filter(|i| i % 3 != 2).count());
        best = (best.0.min(yaml), best.1.min(parsed), best.2.min(planned));
    }
    best
}

fn main() {
    // `--smoke` (CI, often a debug build): one small round, so the bench
    // keeps working; its figures are not a measurement.
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (small, large) = if smoke { (450, 4_500) } else { (4_500, 45_000) };
    let (ys, ps, qs) = measure(small);
    let (yl, pl, ql) = measure(large);
    println!("{small:>6} jobs: serde_yaml alone {ys:>10.2?}  parse {ps:>10.2?}  plan {qs:>10.2?}");
    println!("{large:>6} jobs: serde_yaml alone {yl:>10.2?}  parse {pl:>10.2?}  plan {ql:>10.2?}");
    let r = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "ratio (10x the jobs): serde_yaml alone {:.1}x, parse {:.1}x, plan {:.1}x (linear: about 10)",
        r(ys, yl),
        r(ps, pl),
        r(qs, ql)
    );
}
