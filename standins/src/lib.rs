//! Stand-ins for the servers around the mesh, for tests and fault injection: a
//! Kubernetes API server ([`kube_api`]), the part of istiod a ztunnel talks to
//! ([`controlplane`]: delta ADS and the CA) and an Istio waypoint at L4
//! ([`waypoint`]). Each speaks the real protocol (the kube client's HTTP and watches,
//! gRPC over TLS, HBONE), so the real binaries use them exactly as they use the real
//! servers; the real Kubernetes and istiod run in `cargo xtask cluster-e2e`.

pub mod controlplane;
pub mod kube_api;
pub mod waypoint;

use std::path::PathBuf;

/// A mesh root CA's files (PEM): what the control plane signs with, what a waypoint's
/// certificate is issued from.
#[derive(Clone, Debug)]
pub struct MeshRoot {
    pub cert: PathBuf,
    pub key: PathBuf,
}
