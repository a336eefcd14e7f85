//! Fuzz harnesses for what an image or a registry controls (see
//! docs/fuzzing.md): layer tars, manifests, indexes, image configs,
//! references and authentication challenges.
//!
//! Each harness takes arbitrary bytes and panics only when a property that
//! must hold for every input is broken: no panic, and a layer never
//! creates, changes or removes anything outside the tree it is applied to.
//! `cargo test` drives them with proptest for a bounded number of cases
//! (`PROPTEST_CASES` raises it); the cargo-fuzz targets in `fuzz/` call the
//! same functions. Not part of the API.

use crate::apply::{apply_layer_with, Budget, Compression, Limits};

/// Apply `tar` (as is, then also decompressed when it starts like a gzip
/// or zstd stream) to a fresh root beside a directory it must not touch
/// (`kiln_testkit::fuzz::Sandbox`), which the layer's entries name through
/// `..`, absolute paths, symbolic and hard links.
pub fn layer(tar: &[u8]) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let sandbox = kiln_testkit::fuzz::Sandbox::new(tmp.path());
    let root = sandbox.root();
    // Small limits: a hostile layer hits them quickly instead of filling
    // the disk of whoever runs the fuzzer.
    let limits = Limits {
        max_image_bytes: 1 << 20,
        max_layer_bytes: 1 << 20,
        max_hole_bytes: 1 << 20,
        max_entries: 4096,
        ..Limits::default()
    };
    let _ = apply_layer_with(&root, tar, &Budget::new(limits));
    if let c @ (Compression::Gzip | Compression::Zstd) = Compression::sniff(tar) {
        if let Ok(r) = crate::apply::decompress(tar, c) {
            let _ = apply_layer_with(&root, r, &Budget::new(limits));
        }
    }
    sandbox.check();
}

/// Manifests, indexes and image configs as a registry or an image layout
/// serves them: errors, never panics; a parsed manifest's digests are
/// well-formed (they become file names in the blob store).
pub fn manifests(data: &[u8]) {
    if let Ok(m) = crate::oci::parse_manifest(data, "fuzz") {
        for d in std::iter::once(&m.config).chain(&m.layers) {
            assert!(
                crate::reference::is_sha256_digest(&d.digest),
                "{:?}",
                d.digest
            );
        }
        let _ = crate::oci::parse_image_config(data, "fuzz", m.layers.len());
    }
    if let Ok(list) = crate::oci::parse_index(data, "fuzz") {
        let _ = crate::oci::select_platform(&list);
    }
    let _ = crate::oci::looks_like_index("", data);
    let _ = crate::oci::parse_image_config(
        data,
        "fuzz",
        usize::from(data.first().copied().unwrap_or(0) % 4),
    );
}

/// Image references (from a job's `image:`) and `WWW-Authenticate`
/// challenges (from a registry): no panic; a parsed reference's digest,
/// if any, is well-formed, and its name and tag print back.
pub fn references(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(r) = crate::reference::Reference::parse(&s) {
        let _ = (r.api_host(), r.target(), r.name_and_tag(), r.is_loopback());
    }
    let _ = crate::registry::parse_challenge(&s);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use kiln_testkit::fuzz::{config, hostile_tar, json};

    use super::*;

    proptest! {
        #![proptest_config(config(64))]

        #[test]
        fn hostile_layers_stay_inside_their_root(tar in hostile_tar()) {
            layer(&tar);
        }

        #[test]
        fn any_bytes_as_a_layer(tar in prop::collection::vec(any::<u8>(), 0..3000)) {
            layer(&tar);
        }
    }

    const MANIFEST_KEYS: &[&str] = &[
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "digest",
        "size",
        "platform",
        "architecture",
        "os",
        "annotations",
        "vnd.docker.reference.type",
        "rootfs",
        "diff_ids",
        "type",
        "Env",
        "Cmd",
        "User",
    ];

    proptest! {
        #![proptest_config(config(500))]

        #[test]
        fn manifests_never_panic(data in json(MANIFEST_KEYS)) {
            manifests(data.as_bytes());
        }

        #[test]
        fn manifests_of_any_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
            manifests(&data);
        }

        #[test]
        fn references_and_challenges_never_panic(
            s in "[a-zA-Z0-9:/@._=,\" -]{0,80}|sha256:[0-9a-f]{0,70}"
        ) {
            references(s.as_bytes());
        }
    }
}
