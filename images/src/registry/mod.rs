//! A small OCI distribution client (pull only) on reqwest.
//!
//! - Anonymous, bearer-token (`WWW-Authenticate: Bearer realm=…`) and basic
//!   authentication; credentials from a kiln registries file
//!   (`$KILN_REGISTRY_CONFIG`) and from `~/.docker/config.json` `auths`.
//! - Redirects are followed (blob downloads often go to object storage);
//!   reqwest drops `Authorization` when a redirect changes host or port, and
//!   an `https` → `http` downgrade is refused.
//! - Transient failures (connection errors, 429, 5xx) are retried with
//!   exponential backoff, honouring `Retry-After`; `ratelimit-*` headers are
//!   logged and put into errors.
//! - Plain `http://` only for loopback registries and those configured
//!   insecure.
//! - Manifests and configs are read with a 4 MiB bound; every byte is checked
//!   against its digest (and blobs against their size) before use.

//!
//! - `config.rs`: [`RegistryConfig`] and credentials.
//! - `client.rs`: [`Registry`], requests with auth, retries and backoff.
//! - `auth.rs`: answering a 401 (bearer tokens, basic).
//! - `fetch.rs`: tags, manifests, configs and layer blobs.

mod auth;
mod client;
mod config;
mod fetch;

pub use crate::oci::MAX_MANIFEST;
pub use auth::parse_challenge;
pub use client::Registry;
pub use config::{Credential, RegistryConfig};
pub use fetch::FetchedManifest;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Progress of a pull, for progress bars.
pub trait PullProgress: Send + Sync {
    /// A download of `size` bytes starts (`cached`: it is already here).
    fn layer_start(&self, _digest: &str, _size: u64, _cached: bool) {}
    /// `bytes` more bytes of the layer arrived.
    fn layer_bytes(&self, _digest: &str, _bytes: u64) {}
    /// The layer is downloaded and verified.
    fn layer_done(&self, _digest: &str) {}
    /// A step other than downloading (applying a layer, building the fs).
    fn stage(&self, _msg: &str) {}
}

/// No progress reporting.
pub struct NoProgress;
impl PullProgress for NoProgress {}
