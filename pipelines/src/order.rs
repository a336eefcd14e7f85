//! Run order of a job and its dependencies, shared by both front ends.
//!
//! The graph is built once, in O(V + E): a job's dependencies are its
//! `needs`, or (without `needs`) every non-manual job of the earlier stages.
//! That second kind would be O(V²) edges if written out, so each stage gets
//! one virtual *barrier* node that depends on the barrier before it and on
//! the non-manual jobs of the stage before it; a job without `needs` depends
//! on its stage's barrier. One iterative depth-first search then yields the
//! order and finds cycles in O(V + E + stages), with no recursion.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::limits::chain;
use crate::spec::{JobSpec, JobWhen};

/// The jobs `name` selects: the job of that name, else the instances of the
/// `parallel` or matrix job whose key or id it is (`groups`).
pub(crate) fn select<'a>(
    jobs: &[JobSpec],
    groups: &'a BTreeMap<String, Vec<String>>,
    name: &'a str,
) -> Vec<&'a str> {
    match groups.get(name) {
        Some(g) if !jobs.iter().any(|j| j.name == name) => g.iter().map(String::as_str).collect(),
        _ => vec![name],
    }
}

/// `targets` with their dependencies, dependencies first (in job order
/// among themselves). A job's dependencies are its `needs`, or (when
/// `needs` is `None`) every non-manual job of an earlier stage in `stages`;
/// `jobs` must be in stage order.
pub(crate) fn run_order<'a>(
    jobs: &'a [JobSpec],
    stages: &[String],
    targets: &[&str],
) -> Result<Vec<&'a JobSpec>> {
    let n = jobs.len();
    let mut stage_pos: HashMap<&str, usize> = HashMap::with_capacity(stages.len());
    for (i, s) in stages.iter().enumerate() {
        stage_pos.entry(s.as_str()).or_insert(i);
    }
    let stage_of = |j: &JobSpec| {
        j.stage
            .as_deref()
            .and_then(|s| stage_pos.get(s).copied())
            .unwrap_or(0)
    };
    // A later job of the same name wins, as it always has here.
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let stage_count = stages.len().max(1);
    let barrier = |s: usize| n + s;
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n + stage_count];
    for (i, job) in jobs.iter().enumerate() {
        let s = stage_of(job);
        match &job.needs {
            Some(needs) => {
                let mut d: Vec<usize> = needs
                    .iter()
                    .filter_map(|name| index.get(name.as_str()).copied())
                    .collect();
                d.sort_unstable();
                d.dedup();
                deps[i] = d;
            }
            None if s > 0 => deps[i].push(barrier(s)),
            None => {}
        }
        if s + 1 < stage_count && job.when != JobWhen::Manual {
            deps[barrier(s + 1)].push(i);
        }
    }
    for s in 1..stage_count {
        deps[barrier(s)].insert(0, barrier(s - 1));
    }

    let mut state = vec![0u8; n + stage_count]; // 0 new, 1 on the stack, 2 done
    let mut order = Vec::new();
    let mut stack: Vec<(usize, usize)> = Vec::new(); // (node, next dependency)
    for t in targets {
        let &start = index.get(t).ok_or_else(|| Error::NoSuchJob {
            name: t.to_string(),
        })?;
        if state[start] != 0 {
            continue;
        }
        state[start] = 1;
        stack.push((start, 0));
        while let Some(&mut (i, ref mut next)) = stack.last_mut() {
            let Some(&d) = deps[i].get(*next) else {
                state[i] = 2;
                if i < n {
                    order.push(i);
                }
                stack.pop();
                continue;
            };
            *next += 1;
            match state[d] {
                0 => {
                    state[d] = 1;
                    stack.push((d, 0));
                }
                1 => {
                    let from = stack.iter().position(|&(s, _)| s == d).unwrap_or(0);
                    let names: Vec<&str> = stack[from..]
                        .iter()
                        .chain(std::iter::once(&(d, 0)))
                        .filter(|&&(s, _)| s < n)
                        .map(|&(s, _)| jobs[s].name.as_str())
                        .collect();
                    return Err(Error::Invalid {
                        file: String::new(),
                        location: None,
                        path: names.first().copied().unwrap_or_default().to_string(),
                        message: format!("`needs` form a cycle: {}", chain(&names)),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(order.into_iter().map(|i| &jobs[i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Step;

    fn job(name: &str, stage: &str, needs: Option<&[&str]>, when: JobWhen) -> JobSpec {
        let mut j = JobSpec::single(name, "img", Step::script("s", "true"));
        j.stage = Some(stage.into());
        j.needs = needs.map(|n| n.iter().map(|s| s.to_string()).collect());
        j.when = when;
        j
    }

    fn stages() -> Vec<String> {
        ["build", "test", "deploy"].map(String::from).to_vec()
    }

    fn names(order: &[&JobSpec]) -> Vec<String> {
        order.iter().map(|j| j.name.clone()).collect()
    }

    #[test]
    fn stages_order_and_manual_jobs_stay_out() {
        let jobs = vec![
            job("b1", "build", None, JobWhen::OnSuccess),
            job("b2", "build", None, JobWhen::Manual),
            job("t1", "test", None, JobWhen::OnSuccess),
            job("t2", "test", Some(&["b2"]), JobWhen::OnSuccess),
            job("d1", "deploy", None, JobWhen::OnSuccess),
        ];
        let order = run_order(&jobs, &stages(), &["d1"]).unwrap();
        assert_eq!(names(&order), ["b1", "t1", "b2", "t2", "d1"]);
        let order = run_order(&jobs, &stages(), &["t1"]).unwrap();
        assert_eq!(names(&order), ["b1", "t1"]);
    }

    #[test]
    fn a_need_on_a_later_stage_is_a_cycle_through_the_stages() {
        let jobs = vec![
            job("a", "build", Some(&["b"]), JobWhen::OnSuccess),
            job("b", "test", None, JobWhen::OnSuccess),
        ];
        let e = run_order(&jobs, &stages(), &["a"]).unwrap_err();
        assert!(e.to_string().contains("cycle: a -> b -> a"), "{e}");
        let e = run_order(&jobs, &stages(), &["b"]).unwrap_err();
        assert!(e.to_string().contains("cycle: b -> a -> b"), "{e}");
    }
}
