//! Kubernetes-driven enrollment: which pods belong in the mesh, and (with the watches
//! that feed it) keeping the node's enrollment in step with the API server.

pub mod controller;
pub mod notice;
pub mod queue;
pub mod selection;
pub mod shutdown;
pub mod status;
