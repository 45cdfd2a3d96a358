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
    /// Workloads, services and policies (YAML). Without it, traffic is proxied in
    /// plaintext and nothing is in the mesh.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,
    /// How often the local config file is checked for changes.
    #[arg(long, env = "LOCAL_XDS_POLL", default_value = "1s", value_parser = parse_duration)]
    pub local_xds_poll: Duration,
    /// The mesh root certificate (PEM), RSA or ECDSA.
    #[arg(long, env = "LOCAL_CA_CERT")]
    pub local_ca_cert: Option<PathBuf>,
    /// The mesh root key (PEM, mode 0600).
    #[arg(long, env = "LOCAL_CA_KEY")]
    pub local_ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates; they are renewed at half-life.
    #[arg(long, env = "WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,
    /// An HBONE connection that carried no stream for this long is closed.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_unused_release_timeout: Duration,
    /// Log format: plain or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; with none, ztunnel runs the proxy.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Creates a new mesh root (ECDSA P-256) for a quickstart: writes ca.crt and
    /// ca.key (mode 0600) into the directory.
    CreateRoot {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "3650d", value_parser = parse_duration)]
        validity: Duration,
        #[arg(long)]
        out_dir: PathBuf,
    },
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
            format!(
                "local_xds_path: {}",
                self.local_xds_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            format!(
                "local_ca_cert: {}",
                self.local_ca_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            format!("workload_cert_ttl: {:?}", self.workload_cert_ttl),
            format!(
                "pool_unused_release_timeout: {:?}",
                self.pool_unused_release_timeout
            ),
            format!("log_format: {}", self.log_format),
        ]
    }
}

/// `5s`, `500ms`, `2m`, `24h`, `30d`, or a bare number of seconds.
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
        "h" => Ok(Duration::from_secs(n * 3600)),
        "d" => Ok(Duration::from_secs(n * 86400)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
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
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn port_reuse_can_be_turned_off() {
        let cfg = Config::try_parse_from(["ztunnel", "--inpod-port-reuse", "false"]).unwrap();
        assert!(!cfg.inpod_port_reuse);
    }
}
