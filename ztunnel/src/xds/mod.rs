//! ztunnel's control-plane client: delta ADS with istiod (workloads, services and
//! authorization policies), translated into the domain model.
//!
//! - [`translate`]: istiod's resources -> domain objects, one by one.
//! - [`resources`]: what istiod has sent, by name and version; applying a response.
//! - [`client`]: the stream: ACK/NACK, reconnect with backoff, resume.

pub mod client;
pub mod resources;
pub mod translate;

pub use client::{NodeIdentity, XdsClient, XdsState, XdsStatus};
