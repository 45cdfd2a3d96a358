//! ztunnel's settings: the environment variables Istio's ztunnel reads (so DaemonSet
//! settings carry over), each mirrored by a flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The ambient node proxy, in in-pod mode.
#[derive(Clone, Debug, Parser)]
#[command(version)]
pub struct Config {
    /// Socket of the node agent's ZDS server.
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub inpod_uds: PathBuf,
    /// Set SO_REUSEPORT on pod listeners, so two ztunnels can overlap during an upgrade.
    #[arg(long, env = "INPOD_PORT_REUSE", default_value_t = true, action = clap::ArgAction::Set)]
    pub inpod_port_reuse: bool,
    /// SO_MARK on every socket made for a pod; must match the pod rules (1337 = 0x539).
    #[arg(long, env = "PACKET_MARK", default_value_t = 1337)]
    pub packet_mark: u32,
    /// Name of the node this ztunnel serves.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Address of the readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Grace period in-flight connections get when their pod is drained (e.g. 5s, 500ms).
    #[arg(long, env = "POD_DRAIN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub pod_drain_grace: Duration,
    /// Timeout of each ZDS write and each ack write.
    #[arg(long, env = "ZDS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub zds_timeout: Duration,
    /// Timeout of each upstream connect.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

impl Config {
    /// The startup lines operators grep for (`kubectl logs ds/ztunnel | grep inpod`).
    pub fn startup_lines(&self) -> Vec<String> {
        vec![
            "inpod_enabled: true".to_string(),
            format!("inpod_uds: {}", self.inpod_uds.display()),
            format!("inpod_port_reuse: {}", self.inpod_port_reuse),
            format!("inpod_mark: {}", self.packet_mark),
            format!("node_name: {}", self.node_name),
            format!("readiness_addr: {}", self.readiness_addr),
            format!("pod_drain_grace: {:?}", self.pod_drain_grace),
            format!("zds_timeout: {:?}", self.zds_timeout),
            format!("connect_timeout: {:?}", self.connect_timeout),
        ]
    }
}

/// `5s`, `500ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 5s or 500ms)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_istio_and_print_the_inpod_lines() {
        let cfg = Config::try_parse_from(["ztunnel"]).unwrap();
        let lines = cfg.startup_lines();
        assert_eq!(
            &lines[..4],
            [
                "inpod_enabled: true",
                "inpod_uds: /var/run/ztunnel/ztunnel.sock",
                "inpod_port_reuse: true",
                "inpod_mark: 1337"
            ]
        );
    }

    #[test]
    fn durations_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn port_reuse_can_be_turned_off() {
        let cfg = Config::try_parse_from(["ztunnel", "--inpod-port-reuse", "false"]).unwrap();
        assert!(!cfg.inpod_port_reuse);
    }
}
