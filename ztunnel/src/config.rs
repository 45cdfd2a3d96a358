//! ztunnel's settings: the environment variables Istio's ztunnel reads (so DaemonSet
//! settings carry over), each mirrored by a flag. Durations are bounded at parse time,
//! so no setting can overflow later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Where the mesh state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshSource {
    /// A local config file (`LOCAL_XDS_PATH`).
    LocalFile(PathBuf),
    /// No mesh on purpose (`PASSTHROUGH_ONLY`): plaintext passthrough, no policy.
    Passthrough,
}

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
    /// Workloads, services and policies (YAML), Istio's local config.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,
    /// istiod's xDS address; empty turns xDS off. Default as Istio's:
    /// `https://istiod.istio-system.svc:15012` in a cluster, else
    /// `https://localhost:15012`. (This build has no xDS client yet.)
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// Serve IPv6 as well as IPv4: pod listeners are dual-stack. Off, a pod whose netns
    /// holds a routable IPv6 address is refused (its IPv6 traffic would be uncaptured).
    #[arg(long, env = "IPV6_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6_enabled: bool,
    /// Run with no mesh at all: every pod's traffic is passed through in plaintext,
    /// without policy. For tests and troubleshooting; warned about at startup and for
    /// every pod. Never implied by a missing setting.
    #[arg(long, env = "PASSTHROUGH_ONLY", default_value_t = false, action = clap::ArgAction::Set)]
    pub passthrough_only: bool,
    /// How often the local config file is checked for changes.
    #[arg(long, env = "LOCAL_XDS_POLL", default_value = "1s", value_parser = parse_duration)]
    pub local_xds_poll: Duration,
    /// The mesh root certificate (PEM), RSA or ECDSA.
    #[arg(long, env = "LOCAL_CA_CERT")]
    pub local_ca_cert: Option<PathBuf>,
    /// The mesh root key (PEM, mode 0600).
    #[arg(long, env = "LOCAL_CA_KEY")]
    pub local_ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates (2s to 3650d); they are renewed at half-life.
    #[arg(long, env = "WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_cert_ttl)]
    pub workload_cert_ttl: Duration,
    /// An HBONE connection that carried no stream for this long is closed.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_unused_release_timeout: Duration,
    /// Most CONNECT streams one HBONE connection carries before another is opened.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub pool_max_streams_per_connection: u16,
    /// HTTP/2 flow-control window of each HBONE stream, in bytes.
    #[arg(long, env = "HTTP2_STREAM_WINDOW_SIZE", default_value_t = 4 << 20)]
    pub http2_stream_window_size: u32,
    /// HTTP/2 flow-control window of each HBONE connection, in bytes.
    #[arg(long, env = "HTTP2_CONNECTION_WINDOW_SIZE", default_value_t = 16 << 20)]
    pub http2_connection_window_size: u32,
    /// Largest HTTP/2 frame accepted on HBONE, in bytes (16 KiB to 16 MiB - 1).
    #[arg(long, env = "HTTP2_FRAME_SIZE", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(16384..16_777_216))]
    pub http2_frame_size: u32,
    /// TCP keepalive on every proxied connection, so a half-open peer is found and its
    /// connection closed.
    #[arg(long, env = "KEEPALIVE_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub keepalive_enabled: bool,
    /// Idle time before the first keepalive probe.
    #[arg(long, env = "KEEPALIVE_TIME", default_value = "180s", value_parser = parse_keepalive)]
    pub keepalive_time: Duration,
    /// Time between keepalive probes.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = parse_keepalive)]
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is dropped.
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub keepalive_retries: u32,
    /// Also bound unacknowledged data by TCP_USER_TIMEOUT (keepalive time + retries x
    /// interval).
    #[arg(long, env = "USER_TIMEOUT_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub user_timeout_enabled: bool,
    /// Time a client has to finish the TLS handshake on 15008.
    #[arg(long, env = "HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hbone_handshake_timeout: Duration,
    /// TLS handshakes in progress on one pod's 15008 at most; more are refused at once.
    #[arg(long, env = "HBONE_MAX_HANDSHAKES", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_handshakes: u32,
    /// Time an HTTP client (readiness, and later admin and metrics) has to send its
    /// request headers.
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub http_header_read_timeout: Duration,
    /// Connections each HTTP endpoint serves at once; more are closed at once.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,
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
        #[arg(long, default_value = "3650d", value_parser = parse_cert_ttl)]
        validity: Duration,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// Istio's default xDS address (`XDS_ADDRESS` unset).
fn default_xds_address() -> String {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        "https://istiod.istio-system.svc:15012".into()
    } else {
        "https://localhost:15012".into()
    }
}

impl Config {
    /// The xDS address in force: `None` when xDS is off (`XDS_ADDRESS=""`).
    pub fn xds(&self) -> Option<String> {
        match &self.xds_address {
            None => Some(default_xds_address()),
            Some(a) if a.is_empty() => None,
            Some(a) => Some(a.clone()),
        }
    }

    /// Where mesh state comes from. A ztunnel with no source refuses to start: it would
    /// otherwise carry every pod's traffic in plaintext without policy, and a typo in
    /// a DaemonSet's environment would be enough.
    pub fn mesh_source(&self) -> Result<MeshSource, String> {
        match (&self.local_xds_path, self.passthrough_only) {
            (Some(_), true) => Err(
                "PASSTHROUGH_ONLY and LOCAL_XDS_PATH exclude each other: choose the mesh or no mesh"
                    .into(),
            ),
            (Some(path), false) => Ok(MeshSource::LocalFile(path.clone())),
            (None, true) => Ok(MeshSource::Passthrough),
            (None, false) => Err(format!(
                "no source of mesh state: set LOCAL_XDS_PATH to a local config file{}. \
                 Refusing to start rather than pass every pod's traffic in plaintext; \
                 PASSTHROUGH_ONLY=true runs without a mesh on purpose",
                match self.xds() {
                    Some(addr) => format!(
                        " (XDS_ADDRESS={addr}: this build has no xDS client yet)"
                    ),
                    None => " (XDS_ADDRESS is empty: xDS is off)".into(),
                }
            )),
        }
    }

    /// The startup lines operators grep for (`kubectl logs ds/ztunnel | grep inpod`).
    pub fn startup_lines(&self) -> Vec<String> {
        vec![
            "inpod_enabled: true".to_string(),
            format!("inpod_uds: {}", self.inpod_uds.display()),
            format!("inpod_port_reuse: {}", self.inpod_port_reuse),
            format!("inpod_mark: {}", self.packet_mark),
            format!("ipv6_enabled: {}", self.ipv6_enabled),
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
            format!("xds_address: {}", self.xds().unwrap_or_default()),
            format!("passthrough_only: {}", self.passthrough_only),
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
            format!(
                "keepalive: {} time={:?} interval={:?} retries={}",
                self.keepalive_enabled,
                self.keepalive_time,
                self.keepalive_interval,
                self.keepalive_retries
            ),
            format!("log_format: {}", self.log_format),
        ]
    }
}

/// The longest duration any setting accepts: 100 years. Longer ones would overflow
/// the clocks they are added to.
pub const MAX_DURATION: Duration = Duration::from_secs(36500 * 86400);

/// `5s`, `500ms`, `2m`, `24h`, `30d`, or a bare number of seconds; at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 5s or 500ms)"))?;
    let too_long = || format!("{s:?} is longer than the longest duration accepted (36500d)");
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_long)?),
        "d" => Duration::from_secs(n.checked_mul(86400).ok_or_else(too_long)?),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// A certificate lifetime: 2s to 3650d (a lifetime a renewal at half-life can keep up
/// with, and an expiry no X.509 date overflows).
pub fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) || d > Duration::from_secs(3650 * 86400) {
        return Err(format!(
            "{s:?}: a certificate lifetime must be between 2s and 3650d"
        ));
    }
    Ok(d)
}

/// A keepalive time or interval: whole seconds, 1s to 32767s (the kernel's range).
pub fn parse_keepalive(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(32767) {
        return Err(format!("{s:?}: keepalive times run from 1s to 32767s"));
    }
    Ok(d)
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
    fn oversized_durations_are_errors_not_overflows() {
        for s in [
            "18446744073709551615d",
            "999999999999999h",
            "36501d",
            "99999999999999999m",
        ] {
            let err = parse_duration(s).unwrap_err();
            assert!(err.contains("longest duration"), "{s}: {err}");
        }
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        assert!(parse_cert_ttl("3651d").is_err());
        assert!(parse_cert_ttl("1s").is_err());
        assert!(parse_keepalive("0s").is_err());
        let err = Config::try_parse_from(["ztunnel", "--workload-cert-ttl", "999999999999999d"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("999999999999999d"), "{err}");
    }

    fn without(extra: &[&str]) -> Config {
        let mut args = vec!["ztunnel"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).unwrap()
    }

    #[test]
    fn without_a_source_of_mesh_state_ztunnel_refuses_to_run() {
        let err = without(&[]).mesh_source().unwrap_err();
        assert!(
            err.contains("LOCAL_XDS_PATH")
                && err.contains("XDS_ADDRESS")
                && err.contains("PASSTHROUGH_ONLY"),
            "{err}"
        );
        let err = without(&["--xds-address", ""]).mesh_source().unwrap_err();
        assert!(err.contains("xDS is off"), "{err}");
        assert_eq!(
            without(&["--passthrough-only", "true"]).mesh_source(),
            Ok(MeshSource::Passthrough)
        );
        assert_eq!(
            without(&["--local-xds-path", "/m.yaml"]).mesh_source(),
            Ok(MeshSource::LocalFile("/m.yaml".into()))
        );
        assert!(
            without(&["--local-xds-path", "/m.yaml", "--passthrough-only", "true"])
                .mesh_source()
                .is_err()
        );
    }

    #[test]
    fn port_reuse_can_be_turned_off() {
        let cfg = Config::try_parse_from(["ztunnel", "--inpod-port-reuse", "false"]).unwrap();
        assert!(!cfg.inpod_port_reuse);
    }
}
