//! The ambient node agent (`istio-cni`): enrolls pods into the mesh by installing
//! in-pod traffic redirection and handing each pod's netns to ztunnel over ZDS.
//!
//! - [`rules`]: the redirection ruleset, rendered, applied, verified and removed.
//! - [`zds_server`]: the Unix socket ztunnel connects to.
//! - [`enroll`]: the enrollment API the pod sources call.
//! - [`agent`]: all of it wired together.

pub mod agent;
pub mod cni;
pub mod discovery;
pub mod enroll;
pub mod exec;
pub mod k8s;
pub mod readyz;
pub mod rules;
pub mod zds_server;

pub use agent::{Agent, AgentConfig};
pub use enroll::{EnrollError, EnrollStatus, Enroller, Pod};
