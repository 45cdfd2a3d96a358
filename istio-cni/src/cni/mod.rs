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

/// Reads `path` whole, refusing (with `InvalidData`) a file larger than `max` bytes:
/// the configs and credentials read here are small, and come from other agents.
pub(crate) fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}
