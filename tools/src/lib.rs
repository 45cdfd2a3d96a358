//! The user-facing runs, built on the node harness (`e2e`) and the stand-in servers
//! (`standins`), each a binary `cargo xtask` runs:
//!
//! - `demo`: a local ambient node, step by step (`cargo xtask demo`);
//! - [`bench`]: the system benchmark, ours against the direct path in one run;
//! - [`chaos`]: the fault matrix;
//! - `cluster_e2e` ([`realcluster`], [`clustercheck`], [`incluster`]): the system on a
//!   real Kubernetes cluster beside Istio's istiod.
//!
//! Their shortened forms run in the test suite (`tests/`).

pub mod bench;
pub mod chaos;
pub mod clustercheck;
pub mod incluster;
pub mod realcluster;
pub mod results;
