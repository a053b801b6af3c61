//! The `tenantry-portal` binary refuses a bad start with a clear message and exit code.
//! (These tests also make `cargo test --workspace` build the binary, which the end-to-end
//! tests start through `tenantry-api dev`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn portal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenantry-portal"))
        .args(args)
        .env_remove("TENANTRY_PORTAL_COOKIE_KEY_FILE")
        .output()
        .unwrap()
}

fn listen_arg() -> String {
    format!("127.0.0.1:{}", tenantry_test_support::free_port())
}

#[test]
fn a_missing_cookie_key_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.key");
    let out = portal(&[
        "--listen",
        &listen_arg(),
        "--api",
        "http://127.0.0.1:1",
        "--cookie-key-file",
        missing.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("reading the cookie key") && stderr.contains("no-such.key"),
        "{stderr}"
    );
}

#[test]
fn a_cookie_key_of_the_wrong_size_is_refused_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cookie.key");
    // 16 bytes, base64: a valid encoding of a key that is too short.
    let text = "c2hvcnQta2V5LXNpeHRlZW4=";
    std::fs::write(&key, text).unwrap();
    let out = portal(&[
        "--listen",
        &listen_arg(),
        "--api",
        "http://127.0.0.1:1",
        "--cookie-key-file",
        key.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("32 bytes"), "{stderr}");
    assert!(!stderr.contains(text), "{stderr}");
}

#[test]
fn the_cookie_key_flag_is_required() {
    let out = portal(&["--listen", &listen_arg(), "--api", "http://127.0.0.1:1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--cookie-key-file"), "{stderr}");
}
