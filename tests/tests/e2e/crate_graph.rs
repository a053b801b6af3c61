//! The crate graph is the architecture (docs/architecture.md): this test reads it from
//! `cargo metadata` and fails when a crate depends on one it must not, directly or through
//! another crate. Dev-dependencies (tests, benchmarks) are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Every package each package depends on through normal (and build) dependencies,
/// transitively; keyed and valued by package name.
fn closure() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The host's platform only: other platforms' crates are never downloaded here.
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut direct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let name = name_of[node["id"].as_str().unwrap()].to_owned();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].as_str() != Some("dev"))
            })
            .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned());
        direct.entry(name).or_default().extend(deps);
    }
    let mut all = BTreeMap::new();
    for name in direct.keys() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![name.clone()];
        while let Some(n) = stack.pop() {
            for d in direct.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        all.insert(name.clone(), seen);
    }
    all
}

const WORKSPACE: [&str; 13] = [
    "tenantry-proto",
    "tenantry-process",
    "tenantry-backup",
    "tenantry-kube",
    "tenantry-pki",
    "tenantry-client",
    "tenantryctl",
    "tenantry-portal",
    "tenantry-api",
    "tenantry-operator",
    "tenant-runtime",
    "tenantry-tests",
    "tenantry-test-support",
];

#[test]
fn crates_depend_only_in_the_documented_direction() {
    let graph = closure();
    // (crate, what it may use among the workspace crates; external crates it must not use)
    // Features are unified over the workspace in `cargo metadata`, so a crate's optional
    // dependencies enabled by another member show here too: the external crates listed
    // are ones no feature of that crate brings.
    let rules: [(&str, &[&str], &[&str]); 12] = [
        ("tenantry-proto", &[], &["kube", "sqlx", "rcgen"]),
        ("tenantry-kube", &["tenantry-proto"], &["sqlx", "rcgen"]),
        ("tenantry-pki", &[], &["kube", "tonic", "sqlx"]),
        // Signals and the parent's pipe: nothing but tokio and tracing.
        (
            "tenantry-process",
            &[],
            &["kube", "tonic", "sqlx", "rustls"],
        ),
        // The backup file format and keys: no database, network or cluster of its own.
        (
            "tenantry-backup",
            &[],
            &["kube", "tonic", "sqlx", "rustls", "hyper"],
        ),
        ("tenantry-client", &["tenantry-proto"], &["kube", "sqlx"]),
        (
            "tenantryctl",
            &["tenantry-client", "tenantry-proto"],
            &["kube", "sqlx"],
        ),
        // A client of the API like any other: never the database or the cluster.
        (
            "tenantry-portal",
            &["tenantry-client", "tenantry-proto", "tenantry-process"],
            &["kube", "sqlx"],
        ),
        (
            "tenantry-api",
            &[
                "tenantry-proto",
                "tenantry-kube",
                "tenantry-pki",
                "tenantry-process",
                "tenantry-backup",
            ],
            // Never the operator: it is not among the crates allowed above. (This list
            // held prometheus-client, the operator's, as a stand-in for it; the API serves
            // its own /metrics now.)
            &[],
        ),
        (
            "tenantry-operator",
            &[
                "tenantry-proto",
                "tenantry-kube",
                "tenantry-pki",
                "tenantry-process",
            ],
            &["sqlx"],
        ),
        (
            "tenant-runtime",
            &["tenantry-proto", "tenantry-process", "tenantry-backup"],
            &["kube", "k8s-openapi"],
        ),
        // Every suite builds it: no workspace crate, no database, no Kubernetes.
        (
            "tenantry-test-support",
            &[],
            &["sqlx", "kube", "k8s-openapi"],
        ),
    ];
    let mut problems = vec![];
    for (krate, allowed, forbidden) in rules {
        let Some(deps) = graph.get(krate) else {
            problems.push(format!("{krate} is not in the workspace"));
            continue;
        };
        for dep in deps {
            if WORKSPACE.contains(&dep.as_str()) && !allowed.contains(&dep.as_str()) {
                problems.push(format!("{krate} depends on {dep}"));
            }
            if forbidden.contains(&dep.as_str()) {
                problems.push(format!("{krate} pulls in {dep}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
