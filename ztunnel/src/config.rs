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
    /// xDS (`XDS_ADDRESS`) and/or a local config file (`LOCAL_XDS_PATH`); at least one.
    Mesh {
        xds: Option<String>,
        local: Option<PathBuf>,
    },
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
    /// Address of the admin endpoint (`/config_dump`, `/logging`, `/quitquitquit`):
    /// localhost only, as Istio's.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Address of the Prometheus endpoint (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "STATS_ADDR", default_value = "[::]:15020")]
    pub stats_addr: SocketAddr,
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
    /// `https://localhost:15012`.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// The CA (istiod's) address; default the xDS address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Root certificate(s) (PEM) istiod's serving certificate is checked against.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,
    /// Root certificate(s) (PEM) the CA's serving certificate is checked against.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_ca: PathBuf,
    /// The name istiod's certificate must carry, when it is not the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// The name the CA's certificate must carry, when it is not the address's host.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,
    /// The service-account token file sent to istiod as a bearer token (re-read for
    /// every stream and request, so a rotated token is used).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,
    /// The cluster this ztunnel runs in, as istiod names it (sent with every xDS and
    /// CA request)
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// The cluster's DNS domain (in the xDS node id istiod is sent)
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The trust domain of the local file's workloads that name none (xDS workloads
    /// without one are in Istio's default, `cluster.local`, as istiod means them).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// This ztunnel's pod IP, name and namespace (its xDS node identity).
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    pub instance_ip: String,
    /// This ztunnel's pod name (its xDS node identity)
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// This ztunnel's pod namespace (its xDS node identity)
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// `shared`: one ztunnel for a node's pods, asking the CA for each workload's
    /// certificate on its behalf (ImpersonatedIdentity).
    #[arg(long, env = "PROXY_MODE", default_value = "shared", value_parser = ["shared"])]
    pub proxy_mode: String,
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
    /// Lifetime of workload certificates asked for (2s to 3650d, default 24h); they
    /// are renewed at half-life.
    #[arg(long, env = "SECRET_TTL", value_parser = parse_cert_ttl)]
    pub secret_ttl: Option<Duration>,
    /// The same as `SECRET_TTL` (this project's earlier name); `SECRET_TTL` wins.
    #[arg(long, env = "WORKLOAD_CERT_TTL", value_parser = parse_cert_ttl)]
    pub workload_cert_ttl: Option<Duration>,
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
    /// Proxied connections one pod may have open at once (each CONNECT on 15008 counts
    /// as one); more are refused, logged and counted
    /// (`workload_manager_connections_refused_total`). The node's one ztunnel serves
    /// every pod: the cap keeps one pod from growing its memory without bound.
    #[arg(long, env = "POD_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_max_connections: u32,
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
    /// Prints the build version and the protocol versions this build speaks (as
    /// Istio's ztunnel's `version`), then exits.
    Version,
    /// Creates a new mesh root (ECDSA P-256) for a quickstart: writes ca.crt and
    /// ca.key (mode 0600) into the directory.
    CreateRoot {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "3650d", value_parser = parse_cert_ttl)]
        validity: Duration,
        #[arg(long)]
        out_dir: PathBuf,
        /// Replace an existing ca.crt and ca.key (refused otherwise).
        #[arg(long)]
        overwrite: bool,
    },
    /// Runs the proxy, as with no subcommand: `proxy ztunnel` is what Istio's ztunnel
    /// chart passes its image.
    Proxy {
        #[arg(value_parser = ["ztunnel"])]
        mode: String,
    },
}

/// What `ztunnel version` prints.
pub fn build_info() -> String {
    protocol::message::build_info(&[])
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

    /// The CA address in force (`CA_ADDRESS`, else the xDS address).
    pub fn ca(&self) -> Option<String> {
        match &self.ca_address {
            Some(a) if !a.is_empty() => Some(a.clone()),
            _ => self.xds().or_else(|| Some(default_xds_address())),
        }
    }

    /// The certificate lifetime asked for: `SECRET_TTL`, else `WORKLOAD_CERT_TTL`,
    /// else 24h.
    pub fn secret_ttl(&self) -> Duration {
        self.secret_ttl
            .or(self.workload_cert_ttl)
            .unwrap_or(Duration::from_secs(86400))
    }

    /// Where mesh state comes from. A ztunnel with no source refuses to start: it would
    /// otherwise carry every pod's traffic in plaintext without policy, and a typo in
    /// a DaemonSet's environment would be enough.
    pub fn mesh_source(&self) -> Result<MeshSource, String> {
        let xds = self.xds();
        match (&self.local_xds_path, xds, self.passthrough_only) {
            (None, None, true) => Ok(MeshSource::Passthrough),
            (_, _, true) => Err(
                "PASSTHROUGH_ONLY excludes LOCAL_XDS_PATH and XDS_ADDRESS (set XDS_ADDRESS=\"\" with it): choose the mesh or no mesh"
                    .into(),
            ),
            (None, None, false) => Err(
                "no source of mesh state: XDS_ADDRESS is empty (xDS is off) and LOCAL_XDS_PATH is not set. \
                 Refusing to start rather than pass every pod's traffic in plaintext; \
                 PASSTHROUGH_ONLY=true runs without a mesh on purpose"
                    .into(),
            ),
            (local, xds, false) => Ok(MeshSource::Mesh {
                xds,
                local: local.clone(),
            }),
        }
    }

    /// The startup lines operators grep for (`kubectl logs ds/ztunnel | grep inpod`).
    pub fn startup_lines(&self) -> Vec<String> {
        vec![
            format!("version: {}", build_info()),
            "inpod_enabled: true".to_string(),
            format!("inpod_uds: {}", self.inpod_uds.display()),
            format!("inpod_port_reuse: {}", self.inpod_port_reuse),
            format!("inpod_mark: {}", self.packet_mark),
            format!("ipv6_enabled: {}", self.ipv6_enabled),
            format!("node_name: {}", self.node_name),
            format!("readiness_addr: {}", self.readiness_addr),
            format!("admin_addr: {}", self.admin_addr),
            format!("stats_addr: {}", self.stats_addr),
            format!("pod_drain_grace: {:?}", self.pod_drain_grace),
            format!("pod_max_connections: {}", self.pod_max_connections),
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
            format!("xds_root_ca: {}", self.xds_root_ca.display()),
            format!(
                "alt_xds_hostname: {}",
                self.alt_xds_hostname.clone().unwrap_or_default()
            ),
            format!("ca_address: {}", self.ca().unwrap_or_default()),
            format!("ca_root_ca: {}", self.ca_root_ca.display()),
            format!(
                "alt_ca_hostname: {}",
                self.alt_ca_hostname.clone().unwrap_or_default()
            ),
            format!("auth_token: {}", self.auth_token.display()),
            format!("cluster_id: {}", self.cluster_id),
            format!("cluster_domain: {}", self.cluster_domain),
            format!("trust_domain: {}", self.trust_domain),
            format!("instance_ip: {}", self.instance_ip),
            format!("pod_name: {}", self.pod_name),
            format!("pod_namespace: {}", self.pod_namespace),
            format!("proxy_mode: {}", self.proxy_mode),
            format!("passthrough_only: {}", self.passthrough_only),
            format!(
                "local_ca_cert: {}",
                self.local_ca_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            format!("secret_ttl: {:?}", self.secret_ttl()),
            format!("istio_meta: {:?}", istio_meta()),
            format!(
                "xds_headers: {:?}",
                headers("XDS_HEADER_")
                    .iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>()
            ),
            format!(
                "ca_headers: {:?}",
                headers("CA_HEADER_")
                    .iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>()
            ),
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

/// `ISTIO_META_<KEY>=<value>` variables: the node metadata sent to istiod, keyed
/// without the prefix (as Istio's ztunnel sends them).
pub fn istio_meta() -> Vec<(String, String)> {
    let mut meta: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_string(), v)))
        .collect();
    meta.sort();
    meta
}

/// `<prefix><NAME>=<value>` variables (`XDS_HEADER_`, `CA_HEADER_`): extra gRPC
/// headers, named in lower case with `-` for `_`. Values are printed nowhere (they
/// may be credentials).
pub fn headers(prefix: &str) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| {
            let name = k
                .strip_prefix(prefix)?
                .to_ascii_lowercase()
                .replace('_', "-");
            Some((name, v))
        })
        .collect();
    headers.sort();
    headers
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
        assert!(
            lines[0].starts_with("version: version.BuildInfo{Version:\""),
            "{}",
            lines[0]
        );
        assert_eq!(
            &lines[1..5],
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
    fn mesh_state_comes_from_xds_by_default_and_never_from_nowhere() {
        assert!(matches!(
            without(&[]).mesh_source(),
            Ok(MeshSource::Mesh {
                xds: Some(_),
                local: None
            })
        ));
        let err = without(&["--xds-address", ""]).mesh_source().unwrap_err();
        assert!(
            err.contains("LOCAL_XDS_PATH")
                && err.contains("XDS_ADDRESS")
                && err.contains("PASSTHROUGH_ONLY")
                && err.contains("xDS is off"),
            "{err}"
        );
        assert_eq!(
            without(&["--xds-address", "", "--passthrough-only", "true"]).mesh_source(),
            Ok(MeshSource::Passthrough)
        );
        assert!(without(&["--passthrough-only", "true"])
            .mesh_source()
            .is_err());
        assert_eq!(
            without(&["--xds-address", "", "--local-xds-path", "/m.yaml"]).mesh_source(),
            Ok(MeshSource::Mesh {
                xds: None,
                local: Some("/m.yaml".into())
            })
        );
        assert!(matches!(
            without(&["--local-xds-path", "/m.yaml"]).mesh_source(),
            Ok(MeshSource::Mesh {
                xds: Some(_),
                local: Some(_)
            })
        ));
    }

    #[test]
    fn secret_ttl_wins_over_its_old_name() {
        assert_eq!(without(&[]).secret_ttl(), Duration::from_secs(86400));
        assert_eq!(
            without(&["--workload-cert-ttl", "1h"]).secret_ttl(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            without(&["--workload-cert-ttl", "1h", "--secret-ttl", "2h"]).secret_ttl(),
            Duration::from_secs(7200)
        );
    }

    #[test]
    fn port_reuse_can_be_turned_off() {
        let cfg = Config::try_parse_from(["ztunnel", "--inpod-port-reuse", "false"]).unwrap();
        assert!(!cfg.inpod_port_reuse);
    }
}
