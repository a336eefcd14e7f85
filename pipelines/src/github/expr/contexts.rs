//! What an expression reads: the [`Contexts`] (with the job's status) and
//! the [`ExprLimits`] it is evaluated under.

use std::collections::BTreeMap;

use super::ExprValue;
use crate::limits::Limits;

/// The job's status as status functions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Success,
    Failure,
    Cancelled,
    /// A job this one needs was skipped and none failed: neither
    /// `success()` nor `failure()` holds (job-level `if:` only).
    Skipped,
}

/// The contexts an expression can read.
///
/// At parse time the front end fills what is static (`github`, `matrix`,
/// `strategy`, `runner`, `vars`, and `env` when no step can change it) and
/// sets `partial`: an expression that touches anything else is *deferred*
/// and left in place for the executor. At run time the executor fills
/// `steps` (see [`Contexts::set_step`]), `env`, `secrets`, `needs`, sets
/// `status`, and clears `partial`; unknown contexts then read as `null`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Contexts {
    /// Context name (`github`, `env`, ...) to its value.
    pub values: BTreeMap<String, ExprValue>,
    /// The job status for `success()`/`failure()`/`cancelled()`.
    pub status: Option<JobStatus>,
    pub partial: bool,
    /// Bounds on the expressions evaluated with these contexts.
    pub limits: ExprLimits,
}

/// Bounds on one expression: its length, its nesting, and the size of what
/// it produces (GitHub's runner enforces the same three). Expressions come
/// from the workflow file, so each is checked before parsing or allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExprLimits {
    /// Longest expression, in bytes (GitHub: 21,000).
    pub max_bytes: usize,
    /// Deepest nesting of operators, calls and property accesses (GitHub: 50).
    pub max_depth: usize,
    /// Most bytes one evaluation may produce, all values it builds counted
    /// (GitHub: 1 MiB). One `substitute` call shares one such budget.
    pub max_output: usize,
}

impl Default for ExprLimits {
    fn default() -> Self {
        ExprLimits::from(&Limits::default())
    }
}

impl From<&Limits> for ExprLimits {
    fn from(l: &Limits) -> Self {
        ExprLimits {
            max_bytes: l.max_expression_bytes,
            max_depth: l.max_expression_depth,
            max_output: l.max_expression_output,
        }
    }
}

impl Contexts {
    /// Roughly what the contexts take in memory (for the output budget).
    pub fn approx_bytes(&self) -> usize {
        self.values
            .iter()
            .map(|(k, v)| k.len() + v.approx_bytes())
            .sum()
    }

    /// Sets the `needs` context: `needs.<id>.result` and `.outputs`.
    pub fn set_needs(&mut self, needs: &[crate::NeedResult]) {
        let mut m = BTreeMap::new();
        for n in needs {
            let mut one = BTreeMap::new();
            one.insert("result".to_string(), ExprValue::String(n.result.clone()));
            one.insert(
                "outputs".to_string(),
                ExprValue::object(n.outputs.iter().cloned()),
            );
            m.insert(n.id.clone(), ExprValue::Object(one));
        }
        self.set("needs", ExprValue::Object(m));
    }

    pub fn set(&mut self, name: &str, value: ExprValue) {
        self.values.insert(name.to_string(), value);
    }

    /// Records a finished step: `steps.<id>.outputs`, `.outcome` and
    /// `.conclusion` (`success`, `failure`, `cancelled`, `skipped`).
    pub fn set_step(
        &mut self,
        id: &str,
        outcome: &str,
        conclusion: &str,
        outputs: &[(String, String)],
    ) {
        let mut step = BTreeMap::new();
        step.insert(
            "outputs".to_string(),
            ExprValue::object(outputs.iter().cloned()),
        );
        step.insert(
            "outcome".to_string(),
            ExprValue::String(outcome.to_string()),
        );
        step.insert(
            "conclusion".to_string(),
            ExprValue::String(conclusion.to_string()),
        );
        let steps = self
            .values
            .entry("steps".to_string())
            .or_insert_with(|| ExprValue::Object(BTreeMap::new()));
        if let ExprValue::Object(m) = steps {
            m.insert(id.to_string(), ExprValue::Object(step));
        }
    }
}
