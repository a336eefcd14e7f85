//! `parallel:`: a job run as several instances. `parallel: N` makes jobs
//! `name i/N`; `parallel: matrix` makes one job per combination of values,
//! named `name: [v1, v2]`, each with its values as variables. Every
//! instance gets `CI_NODE_INDEX` and `CI_NODE_TOTAL`.

use serde_yaml::{Mapping, Value};

use super::Parser;
use crate::error::Result;
use crate::limits::bytes;
use crate::yaml::{self, join, key, scalar, Seg};

/// One instance of a job after `parallel` expansion.
pub(super) struct Instance {
    pub(super) name: String,
    pub(super) vars: Vec<(String, String)>,
}

impl Parser<'_> {
    /// The instances of job `name`: one, named `name`, without `parallel`.
    pub(super) fn expand_parallel(&self, name: &str, job: &Mapping) -> Result<Vec<Instance>> {
        let single = || {
            vec![Instance {
                name: name.to_string(),
                vars: Vec::new(),
            }]
        };
        let path = [key(name), key("parallel")];
        let Some(par) = job.get("parallel") else {
            return Ok(single());
        };
        let max = self.limits.max_parallel;
        let too_many = || {
            self.limit(
                &path,
                format!("`parallel` may create at most {max} jobs (max_parallel)"),
            )
        };
        if let Some(n) = par.as_u64() {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if !(1..=max).contains(&n) {
                return Err(too_many());
            }
            return Ok((1..=n)
                .map(|i| Instance {
                    name: format!("{name} {i}/{n}"),
                    vars: vec![
                        ("CI_NODE_INDEX".into(), i.to_string()),
                        ("CI_NODE_TOTAL".into(), n.to_string()),
                    ],
                })
                .collect());
        }
        let Some(matrix) = par.get("matrix").and_then(Value::as_sequence) else {
            return Err(self.err(&path, "`parallel` must be a number or have a `matrix` list"));
        };
        let mut combos = Vec::new();
        for (i, entry) in matrix.iter().enumerate() {
            let ep = join(&path, &[key("matrix"), Seg::Index(i)]);
            let room = max.saturating_sub(combos.len());
            combos.extend(matrix_entry(entry, room, self.out_budget.left()).map_err(
                |e| match e {
                    MatrixError::TooMany => too_many(),
                    MatrixError::TooLarge => self.limit(
                        &ep,
                        format!(
                            "the matrix's combinations come to more than {} (max_output_bytes)",
                            bytes(self.out_budget.max())
                        ),
                    ),
                    MatrixError::Shape => self.err(
                        &ep,
                        "a matrix entry maps variable names to a value or a list of values",
                    ),
                },
            )?);
        }
        let total = combos.len();
        Ok(combos
            .into_iter()
            .enumerate()
            .map(|(i, mut vars)| {
                let name = matrix_name(name, &vars);
                vars.push(("CI_NODE_INDEX".into(), (i + 1).to_string()));
                vars.push(("CI_NODE_TOTAL".into(), total.to_string()));
                Instance { name, vars }
            })
            .collect())
    }
}

/// The name of the matrix instance of `job` with these variables:
/// `job: [v1, v2]`, values in key order.
pub(super) fn matrix_name(job: &str, vars: &[(String, String)]) -> String {
    let values: Vec<&str> = vars.iter().map(|(_, v)| v.as_str()).collect();
    format!("{job}: [{}]", values.join(", "))
}

pub(super) enum MatrixError {
    /// Not a mapping of names to values or lists of values.
    Shape,
    /// More than the room left.
    TooMany,
    /// The combinations would take more than the bytes left.
    TooLarge,
}

/// Expands one `parallel: matrix` entry into variable sets, keys in file
/// order, the last key varying fastest. The size of the product is checked
/// against `room` before any combination is built.
pub(super) fn matrix_entry(
    entry: &Value,
    room: usize,
    max_bytes: usize,
) -> Result<Vec<Vec<(String, String)>>, MatrixError> {
    let m = entry.as_mapping().ok_or(MatrixError::Shape)?;
    let mut product = 1usize;
    for (_, v) in m {
        let n = match v {
            Value::Sequence(s) => s.len(),
            _ => 1,
        };
        product = product.saturating_mul(n);
    }
    if product > room {
        return Err(MatrixError::TooMany);
    }
    // Each value of a key with n values appears in product / n combinations.
    let mut total = 0usize;
    for (k, v) in m {
        let k_len = k.as_str().map_or(0, str::len) + crate::NODE_BYTES;
        let (n, text) = match v {
            Value::Sequence(s) => (s.len(), s.iter().map(|x| yaml::size_of(x, max_bytes)).sum()),
            other => (1, yaml::size_of(other, max_bytes)),
        };
        let copies = product / n.max(1);
        total = total
            .saturating_add(copies.saturating_mul(n).saturating_mul(k_len))
            .saturating_add(copies.saturating_mul(text));
    }
    if total > max_bytes {
        return Err(MatrixError::TooLarge);
    }
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (k, v) in m {
        let k = k.as_str().ok_or(MatrixError::Shape)?;
        let values: Vec<String> = match v {
            Value::Sequence(s) => s
                .iter()
                .map(scalar)
                .collect::<Option<_>>()
                .ok_or(MatrixError::Shape)?,
            other => vec![scalar(other).ok_or(MatrixError::Shape)?],
        };
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for c in &combos {
            for val in &values {
                let mut c = c.clone();
                c.push((k.to_string(), val.clone()));
                next.push(c);
            }
        }
        combos = next;
    }
    Ok(combos)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{job, names, parse_err, parse_ok, var};
    use super::*;

    #[test]
    fn numbered_parallel_names_and_variables() {
        let p = parse_ok("t:\n  script: x\n  parallel: 3\n");
        assert_eq!(names(&p), ["t 1/3", "t 2/3", "t 3/3"]);
        let j = job(&p, "t 2/3");
        assert_eq!(var(j, "CI_NODE_INDEX"), Some("2"));
        assert_eq!(var(j, "CI_NODE_TOTAL"), Some("3"));
        assert_eq!(j.id, "t");
        assert_eq!(p.parallel_groups["t"].len(), 3);
        let order: Vec<&str> = p
            .run_order("t")
            .unwrap()
            .iter()
            .map(|j| j.name.as_str())
            .collect();
        assert_eq!(order, ["t 1/3", "t 2/3", "t 3/3"]);
    }

    #[test]
    fn matrix_combinations_in_key_order_last_key_fastest() {
        let p = parse_ok(
            "t:\n  script: x\n  parallel:\n    matrix:\n\
             \x20     - OS: [linux, mac]\n        ARCH: [x86, arm]\n\
             \x20     - OS: bsd\n",
        );
        assert_eq!(
            names(&p),
            [
                "t: [linux, x86]",
                "t: [linux, arm]",
                "t: [mac, x86]",
                "t: [mac, arm]",
                "t: [bsd]"
            ]
        );
        let j = job(&p, "t: [mac, arm]");
        assert_eq!(var(j, "OS"), Some("mac"));
        assert_eq!(var(j, "ARCH"), Some("arm"));
        assert_eq!(var(j, "CI_NODE_INDEX"), Some("4"));
        assert_eq!(var(j, "CI_NODE_TOTAL"), Some("5"));
    }

    #[test]
    fn parallel_is_bounded_and_checked() {
        let e = parse_err("t:\n  script: x\n  parallel: 0\n");
        assert!(e.contains("max_parallel"), "{e}");
        let e = parse_err("t:\n  script: x\n  parallel: 201\n");
        assert!(e.contains("at most 200 jobs"), "{e}");
        let e = parse_err("t:\n  script: x\n  parallel:\n    matrix:\n      - [1]\n");
        assert!(
            e.contains(":5:7: t.parallel.matrix[0]: a matrix entry maps"),
            "{e}"
        );
        let e = parse_err("t:\n  script: x\n  parallel: many\n");
        assert!(e.contains("must be a number or have a `matrix`"), "{e}");
    }

    #[test]
    fn matrix_entry_checks_the_product_before_building_it() {
        let entry: Value = serde_yaml::from_str("{A: [1, 2, 3], B: [x, y]}").unwrap();
        assert!(matches!(
            matrix_entry(&entry, 5, usize::MAX),
            Err(MatrixError::TooMany)
        ));
        assert!(matches!(
            matrix_entry(&entry, 6, 10),
            Err(MatrixError::TooLarge)
        ));
        let combos = matrix_entry(&entry, 6, usize::MAX).ok().unwrap();
        assert_eq!(combos.len(), 6);
        assert_eq!(matrix_name("j", &combos[1]), "j: [1, y]");
    }
}
