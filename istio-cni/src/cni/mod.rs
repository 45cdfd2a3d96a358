//! The chained CNI plugin and its channel to the agent.
//!
//! - [`plugin`]: the plugin process (`istio-cni` run with `CNI_COMMAND` set).
//! - [`event`]: the versioned plugin <-> agent messages.
//! - [`server`]: the agent's socket that receives them.

pub mod event;
pub mod install;
pub mod plugin;
pub mod server;
