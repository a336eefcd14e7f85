//! Run order of a job and its dependencies, shared by both front ends.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::spec::{JobSpec, JobWhen};

/// `targets` with their dependencies, dependencies first. A job's
/// dependencies are its `needs`, or (when `needs` is `None`) every
/// non-manual job of an earlier stage in `stages`.
pub(crate) fn run_order<'a>(
    jobs: &'a [JobSpec],
    stages: &[String],
    targets: &[&str],
) -> Result<Vec<&'a JobSpec>> {
    let stage_idx = |j: &JobSpec| {
        j.stage
            .as_ref()
            .and_then(|s| stages.iter().position(|x| x == s))
            .unwrap_or(0)
    };
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let deps = |i: usize| -> Vec<usize> {
        let job = &jobs[i];
        let mut d: Vec<usize> = match &job.needs {
            Some(needs) => needs
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect(),
            None => {
                let s = stage_idx(job);
                (0..jobs.len())
                    .filter(|&k| stage_idx(&jobs[k]) < s && jobs[k].when != JobWhen::Manual)
                    .collect()
            }
        };
        d.sort_unstable();
        d
    };
    let mut state = vec![0u8; jobs.len()]; // 0 new, 1 on the stack, 2 done
    let mut order = Vec::new();
    for t in targets {
        let &start = index.get(t).ok_or_else(|| Error::NoSuchJob {
            name: t.to_string(),
        })?;
        // Iterative DFS: (job, next dependency to look at).
        let mut stack: Vec<(usize, usize)> = Vec::new();
        if state[start] == 0 {
            state[start] = 1;
            stack.push((start, 0));
        }
        while let Some(&mut (i, ref mut next)) = stack.last_mut() {
            let ds = deps(i);
            if let Some(&d) = ds.get(*next) {
                *next += 1;
                match state[d] {
                    0 => {
                        state[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(s, _)| s == d).unwrap_or(0);
                        let mut chain: Vec<&str> = stack[from..]
                            .iter()
                            .map(|&(s, _)| jobs[s].name.as_str())
                            .collect();
                        chain.push(jobs[d].name.as_str());
                        return Err(Error::Invalid {
                            file: String::new(),
                            location: None,
                            path: jobs[d].name.clone(),
                            message: format!("`needs` form a cycle: {}", chain.join(" -> ")),
                        });
                    }
                    _ => {}
                }
            } else {
                state[i] = 2;
                order.push(i);
                stack.pop();
            }
        }
    }
    Ok(order.into_iter().map(|i| &jobs[i]).collect())
}
