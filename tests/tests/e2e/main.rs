//! The end-to-end tests, in one binary: the real binaries on this machine (`local_mode`);
//! on a real cluster when `KUBECONFIG` names one (`cluster_operator`, `cluster_api`, which
//! take turns through a lock); and checks of the workspace itself (`crate_graph`,
//! `readme`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cluster_api;
mod cluster_operator;
mod crate_graph;
mod faults;
mod local_mode;
mod portal;
mod readme;
mod replicas;
mod token_keys;
