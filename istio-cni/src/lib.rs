//! The ambient node agent (`istio-cni`): enrolls pods into the mesh by installing
//! in-pod traffic redirection and handing each pod's netns to ztunnel over ZDS.
//!
//! - [`enrollment`]: the one owner of every pod's enrollment (rules, ZDS, probe set,
//!   annotation), whatever asks for it.
//! - [`rules`]: the redirection ruleset, rendered, applied, verified and removed.
//! - [`zds_server`]: the Unix socket ztunnel connects to (a transport).
//! - [`k8s`]: which pods belong in the mesh, from the Kubernetes API.
//! - [`cni`]: the chained CNI plugin, its socket to the agent, and install-cni.
//! - [`agent`]: the core wired together.

pub mod agent;
pub mod cni;
pub mod diagnose;
pub mod discovery;
pub mod enrollment;
pub mod exec;
pub mod fswatch;
pub mod http;
pub mod istio_env;
pub mod k8s;
pub mod metrics;
pub mod rules;
pub mod zds_server;

pub use agent::{Agent, AgentConfig, Startup};
pub use enrollment::{EnrollError, EnrollStatus, Enrollment, Pod};
