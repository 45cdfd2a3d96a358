//! The CNI plugin <-> agent messages: one JSON request and one JSON response per
//! connection on a Unix stream socket (`/var/run/istio-cni/pluginevent.sock`).
//!
//! Both carry a version. After an upgrade the installed plugin may be older or newer
//! than the running agent: the agent answers every version up to its own, and refuses a
//! newer one with an error that says so, which the plugin reports as a CNI error.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The version this build speaks.
pub const EVENT_VERSION: u32 = 1;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/var/run/istio-cni/pluginevent.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Command {
    /// Enroll the pod (it belongs in the mesh): answer once it is, or with the error.
    Add,
    /// The pod's sandbox is going away.
    Del,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub version: u32,
    pub command: Command,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    pub service_account: String,
    pub netns: PathBuf,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `CNI_CONTAINERID`: with the netns, what tells one sandbox of a pod from the next.
    /// (Added within version 1: an older agent ignores it, an older plugin omits it.)
    #[serde(default)]
    pub container_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub version: u32,
    /// Empty on success.
    #[serde(default)]
    pub error: String,
    /// `enabled` or `pending` after an Add.
    #[serde(default)]
    pub status: String,
}

impl Response {
    pub fn ok(status: &str) -> Response {
        Response {
            version: EVENT_VERSION,
            error: String::new(),
            status: status.to_string(),
        }
    }

    pub fn err(error: impl Into<String>) -> Response {
        Response {
            version: EVENT_VERSION,
            error: error.into(),
            status: String::new(),
        }
    }
}

/// Whether this build speaks plugin-event `version` (every one from 1 to its own).
fn speaks(version: u32) -> bool {
    (1..=EVENT_VERSION).contains(&version)
}

/// The plugin's check of the agent's answer: an agent answers in the request's
/// version, so a newer one means an agent that does not (or a stray server).
pub fn check_answer_version(version: u32) -> Result<(), String> {
    if !speaks(version) {
        return Err(format!(
            "the agent answered in plugin-event version {version}, this plugin speaks only \
             up to {EVENT_VERSION}: the plugin binary is older than the agent (the agent \
             installs its own at startup; check its install-cni log)"
        ));
    }
    Ok(())
}

/// The agent's check of a request's version.
pub fn check_version(version: u32) -> Result<(), String> {
    if !speaks(version) {
        return Err(format!(
            "the plugin speaks plugin-event version {version}, this agent only up to {EVENT_VERSION}: upgrade the agent"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_newer_versions_are_refused_clearly() {
        let r = Request {
            version: EVENT_VERSION,
            command: Command::Add,
            pod_name: "p".into(),
            pod_namespace: "n".into(),
            pod_uid: "u".into(),
            service_account: "sa".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            container_id: "c1".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"podNamespace\":\"n\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let old_plugin = text.replace(",\"containerId\":\"c1\"", "");
        assert_ne!(old_plugin, text);
        assert_eq!(
            serde_json::from_str::<Request>(&old_plugin)
                .unwrap()
                .container_id,
            ""
        );
        assert!(check_version(1).is_ok());
        assert!(check_version(2).unwrap_err().contains("upgrade the agent"));
        assert!(check_answer_version(1).is_ok());
        assert!(check_answer_version(0).is_err());
        assert!(check_answer_version(2)
            .unwrap_err()
            .contains("plugin-event version 2"));
    }
}
