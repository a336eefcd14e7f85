//! The `workflow_job` webhook (`shared/reference/ci-protocols.md` §2.1):
//! `X-Hub-Signature-256` is checked over the exact bytes received, in
//! constant time, before anything else is read; deliveries are
//! de-duplicated by `X-GitHub-Delivery`; the service decides what an event
//! changes ([`super::service::Service::on_event`]).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::service::Service;

/// GitHub caps payloads at 25 MB; a `workflow_job` event is a few KiB.
pub const MAX_BODY: usize = 1 << 20;
/// Delivery ids remembered for de-duplication.
const DELIVERIES: usize = 10_000;

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`. The comparison takes the same time wherever the bytes differ.
pub fn signature_valid(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The parts of a `workflow_job` event kiln reads.
#[derive(Debug, Clone, Deserialize)]
pub struct JobEvent {
    pub action: String,
    pub workflow_job: EventJob,
    #[serde(default)]
    pub repository: Option<Repository>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventJob {
    pub id: u64,
    #[serde(default)]
    pub run_id: u64,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub runner_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    pub full_name: String,
}

/// Recently seen delivery ids, bounded.
#[derive(Default)]
pub struct Deliveries {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Deliveries {
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// False when `id` was seen already.
    pub fn first_time(&mut self, id: &str) -> bool {
        if !self.set.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        while self.order.len() > DELIVERIES {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The endpoint: any path, `POST` only.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .fallback(axum::routing::post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(service)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn receive(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let Some(secret) = service.webhook_secret() else {
        return (StatusCode::NOT_FOUND, "no webhook here\n");
    };
    if !signature_valid(
        secret.as_bytes(),
        &body,
        header(&headers, "x-hub-signature-256"),
    ) {
        service.count_bad_signature();
        tracing::warn!(
            github = %service.name(),
            "webhook refused: missing or wrong X-Hub-Signature-256"
        );
        return (StatusCode::UNAUTHORIZED, "bad signature\n");
    }
    let delivery = header(&headers, "x-github-delivery");
    match header(&headers, "x-github-event") {
        "ping" => return (StatusCode::OK, "pong\n"),
        "workflow_job" => {}
        _ => return (StatusCode::ACCEPTED, "ignored: not a workflow_job event\n"),
    }
    if delivery.is_empty() || delivery.len() > 100 {
        return (StatusCode::BAD_REQUEST, "no X-GitHub-Delivery\n");
    }
    if !service.first_delivery(delivery) {
        tracing::debug!(github = %service.name(), delivery, "duplicate delivery ignored");
        return (StatusCode::OK, "duplicate delivery\n");
    }
    let event: JobEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(github = %service.name(), delivery, "webhook payload not understood: {e}");
            return (StatusCode::BAD_REQUEST, "not a workflow_job payload\n");
        }
    };
    if service.on_event(&event) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::ACCEPTED,
            "not accepted: no profile or scope matches\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_test_vector_verifies() {
        // docs: validating-webhook-deliveries.
        let secret = b"It's a Secret to Everybody";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_valid(secret, b"Hello, World!", sig));
        assert!(!signature_valid(secret, b"Hello, World?", sig));
        assert!(!signature_valid(b"another secret", b"Hello, World!", sig));
        assert!(
            !signature_valid(secret, b"Hello, World!", &sig[7..]),
            "no prefix"
        );
        assert!(!signature_valid(secret, b"Hello, World!", "sha256=zz"));
        assert!(!signature_valid(
            secret,
            b"Hello, World!",
            &sig[..sig.len() - 2]
        ));
        assert!(!signature_valid(secret, b"Hello, World!", ""));
    }

    #[test]
    fn deliveries_are_remembered_and_bounded() {
        let mut d = Deliveries::default();
        assert!(d.first_time("a"));
        assert!(!d.first_time("a"));
        for i in 0..DELIVERIES {
            assert!(d.first_time(&i.to_string()));
        }
        assert!(d.set.len() <= DELIVERIES);
        assert!(d.first_time("a"), "the oldest was forgotten");
    }
}
