//! The README's Quick start is what a newcomer runs: exactly two commands, the first
//! starting the control plane with `tenantry-api dev`, the second the test command that
//! the CI gate runs too.

use std::path::Path;

fn quick_start_commands() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("README has a Quick start");
    let section = section.split("\n## ").next().unwrap();
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block && !line.trim().is_empty() {
            commands.push(line.trim().to_owned());
        }
    }
    commands
}

#[test]
fn quick_start_is_two_commands_that_start_dev_and_run_the_tests() {
    let commands = quick_start_commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].contains("tenantry-api dev"), "{}", commands[0]);
    assert_eq!(commands[1], "cargo test --workspace");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim().starts_with(&commands[1])),
        "the CI gate must run the README's test command"
    );
}

#[test]
fn the_dev_command_names_binaries_this_workspace_builds() {
    let commands = quick_start_commands();
    let binary = commands[0]
        .split("&&")
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert_eq!(binary, "./target/debug/tenantry-api");
    let exe = std::env::current_exe().unwrap();
    let built = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("tenantry-api");
    assert!(
        built.is_file(),
        "the workspace build makes {}",
        built.display()
    );
}
