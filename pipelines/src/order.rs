//! Run order of a job and its dependencies, shared by both front ends.
//!
//! The graph is built once, in O(V + E): a job's dependencies are its
//! `needs`, or (without `needs`) every non-manual job of the earlier stages.
//! That second kind would be O(V²) edges if written out, so each stage gets
//! one virtual *barrier* node that depends on the barrier before it and on
//! the non-manual jobs of the stage before it; a job without `needs` depends
//! on its stage's barrier. One iterative depth-first search then yields the
//! order and finds cycles in O(V + E + stages), with no recursion.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::limits::chain;
use crate::spec::{JobSpec, JobWhen};

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
