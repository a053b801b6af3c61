//! Replays every committed seed and crash reproducer of every fuzz target (the same
//! bodies `cargo fuzz` runs), so a regression fails a plain `cargo test`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use tenantry_fuzz::{TARGETS, corpus_files, verify_input};
use tenantry_proto::token::TokenError;

#[test]
fn every_committed_input_passes_its_target() {
    let mut failures = Vec::new();
    for (name, body) in TARGETS {
        let files = corpus_files(name).unwrap();
        assert!(files.len() >= 3, "{name} has {} seed files", files.len());
        for file in files {
            let data = std::fs::read(&file).unwrap();
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

/// The token target reaches the claim checks: its fixture key signs the seeds, so the
/// valid one is accepted and the others are refused for the reason their name gives.
#[test]
fn the_token_seeds_reach_the_claim_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/instance_token");
    let verdict = |name: &str| {
        verify_input(&std::fs::read(dir.join(name)).unwrap())
            .unwrap()
            .1
    };
    assert_eq!(verdict("signed-valid").unwrap().aud, "acme");
    assert_eq!(verdict("signed-expired"), Err(TokenError::Expired));
    assert_eq!(
        verdict("signed-wrong-audience"),
        Err(TokenError::WrongAudience)
    );
    assert_eq!(
        verdict("signed-alg-none"),
        Err(TokenError::UnsupportedAlgorithm)
    );
    assert_eq!(verdict("signed-crit"), Err(TokenError::UnsupportedHeader));
    assert_eq!(verdict("raw-forged"), Err(TokenError::BadSignature));
    assert_eq!(verdict("raw-two-parts"), Err(TokenError::Malformed));
}
