//! Replays every committed seed and crash reproducer of every fuzz target (the same
//! bodies `cargo fuzz` runs), so a regression fails a plain `cargo test`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use tenantry_fuzz::{TARGETS, corpus_files};

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
