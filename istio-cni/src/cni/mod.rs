//! The chained CNI plugin, its channel to the agent, and its installation.
//!
//! - [`plugin`]: the plugin process (`istio-cni` run with `CNI_COMMAND` set).
//! - [`event`]: the versioned plugin <-> agent messages.
//! - [`server`]: the agent's socket that receives them.
//! - [`install`]: install-cni, the plugin put (and kept) in the node's CNI chain.
//! - [`kubeconfig`]: the plugin's self-contained kubeconfig.

pub mod event;
pub mod install;
pub mod kubeconfig;
pub mod plugin;
pub mod server;
