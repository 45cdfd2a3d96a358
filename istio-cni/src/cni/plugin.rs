//! The chained CNI plugin: the last plugin of the node's conflist. The runtime runs it
//! after the primary CNI wired the pod; if the pod belongs in the mesh it asks the agent
//! to enroll it and returns only once it is, so the app's first byte is already
//! captured. If the agent cannot, ADD fails and the runtime retries: an ambient pod
//! never starts uncaptured. A pod outside the mesh never depends on the agent: the
//! plugin decides membership itself, from the API server; a pod in an excluded
//! namespace is decided before any network call, so it never waits on (or fails
//! because of) the API server or the agent either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::event::{self, Command, Request, Response, EVENT_VERSION};
use crate::k8s::selection::{Selection, Verdict};

/// The most read from stdin (a network config) and from the agent (its answer).
const MAX_STDIN: u64 = 1 << 20;
const MAX_REPLY: u64 = 64 << 10;

/// CNI spec versions this plugin implements.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error result (the spec's well-known codes, 1–11, or ours, 100+).
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

/// Our part of the plugin's network config.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
struct Config {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
    /// ztunnel's namespace (Istio's name for the field).
    #[serde(default = "default_system_namespace")]
    pod_namespace: String,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    event::DEFAULT_SOCKET.into()
}

fn default_system_namespace() -> String {
    crate::k8s::selection::DEFAULT_SYSTEM_NAMESPACE.into()
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

fn default_timeout() -> u64 {
    10
}

/// `CNI_ARGS`: `K=V;K=V`.
fn cni_args(raw: &str) -> HashMap<String, String> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The addresses of a previous result (`ips[].address`, CIDR form).
fn result_ips(prev: &Value) -> Vec<IpAddr> {
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Runs one CNI command. `env` holds the `CNI_*` variables. Returns what to print on
/// success (nothing for DEL, CHECK and GC).
pub async fn run(
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Result<Option<String>, (String, CniError)> {
    let command = env.get("CNI_COMMAND").cloned().unwrap_or_default();
    let fail = |version: &str, e: CniError| (version.to_string(), e);
    if command == "VERSION" {
        let asked: Option<String> = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string));
        return Ok(Some(
            json!({"cniVersion": asked.unwrap_or_else(|| "1.1.0".into()), "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        fail(
            "1.0.0",
            CniError::new(
                6,
                "cannot decode the network config on stdin",
                e.to_string(),
            ),
        )
    })?;
    let version = raw["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    let cfg: Config = serde_json::from_value(raw).map_err(|e| {
        fail(
            &version,
            CniError::new(7, "invalid istio-cni network config", e.to_string()),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&cfg.cni_version.as_str()) {
        return Err(fail(
            &version,
            CniError::new(
                1,
                format!("unsupported cniVersion {}", cfg.cni_version),
                format!("supported: {SUPPORTED_VERSIONS:?}"),
            ),
        ));
    }
    let need = |name: &str| {
        env.get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| fail(&version, CniError::new(4, format!("{name} is not set"), "")))
    };
    match command.as_str() {
        "ADD" => {
            let netns = need("CNI_NETNS")?;
            need("CNI_CONTAINERID")?;
            let prev = cfg.prev_result.clone().ok_or_else(|| {
                fail(
                    &version,
                    CniError::new(
                        7,
                        "no prevResult: istio-cni must be chained after the primary CNI plugin",
                        "",
                    ),
                )
            })?;
            let pass = Ok(Some(prev.to_string()));
            let args = cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default());
            let (Some(name), Some(namespace)) =
                (args.get("K8S_POD_NAME"), args.get("K8S_POD_NAMESPACE"))
            else {
                return pass; // not a Kubernetes pod
            };
            if cfg.exclude_namespaces.iter().any(|n| n == namespace) {
                return pass; // never in the mesh: decided without asking anyone
            }
            let pod = match member(&cfg, namespace, name).await {
                Ok(Some(pod)) => pod,
                Ok(None) => return pass,
                Err(e) => return Err(fail(&version, e)),
            };
            let request = Request {
                version: EVENT_VERSION,
                command: Command::Add,
                pod_name: name.clone(),
                pod_namespace: namespace.clone(),
                pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                netns: netns.into(),
                ips: result_ips(&prev),
                container_id: env.get("CNI_CONTAINERID").cloned().unwrap_or_default(),
            };
            let response = ask_agent(&cfg, &request)
                .await
                .map_err(|e| fail(&version, e))?;
            if !response.error.is_empty() {
                return Err(fail(
                    &version,
                    CniError::new(
                        11,
                        format!("istio-cni agent could not enroll pod {namespace}/{name}"),
                        response.error,
                    ),
                ));
            }
            pass
        }
        "DEL" => {
            let args = cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default());
            if let (Some(name), Some(namespace)) =
                (args.get("K8S_POD_NAME"), args.get("K8S_POD_NAMESPACE"))
            {
                let request = Request {
                    version: EVENT_VERSION,
                    command: Command::Del,
                    pod_name: name.clone(),
                    pod_namespace: namespace.clone(),
                    pod_uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
                    service_account: String::new(),
                    netns: env.get("CNI_NETNS").cloned().unwrap_or_default().into(),
                    ips: Vec::new(),
                    container_id: env.get("CNI_CONTAINERID").cloned().unwrap_or_default(),
                };
                // DEL must succeed even when the agent is away; the agent also
                // unenrolls pods whose objects are deleted.
                let _ = ask_agent(&cfg, &request).await;
            }
            Ok(None)
        }
        "CHECK" | "GC" => Ok(None),
        "STATUS" => match tokio::net::UnixStream::connect(&cfg.agent_socket).await {
            Ok(_) => Ok(None),
            Err(e) => Err(fail(
                &version,
                CniError::new(
                    50,
                    "the istio-cni agent is not available",
                    format!("{}: {e}", cfg.agent_socket.display()),
                ),
            )),
        },
        other => Err(fail(
            &version,
            CniError::new(4, format!("unknown CNI_COMMAND {other:?}"), ""),
        )),
    }
}

/// The pod, if it belongs in the mesh; an API server that does not answer within the
/// config's timeout is an error (the runtime retries), never a hang.
async fn member(cfg: &Config, namespace: &str, name: &str) -> Result<Option<Pod>, CniError> {
    let limit = Duration::from_secs(cfg.timeout_seconds);
    tokio::time::timeout(limit, ask_api(cfg, namespace, name))
        .await
        .unwrap_or_else(|_| {
            Err(CniError::new(
                11,
                "cannot reach the Kubernetes API to decide whether the pod is in the mesh",
                format!("no answer within {}s", cfg.timeout_seconds),
            ))
        })
}

async fn ask_api(cfg: &Config, namespace: &str, name: &str) -> Result<Option<Pod>, CniError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        CniError::new(
            11,
            "cannot reach the Kubernetes API to decide whether the pod is in the mesh",
            e.to_string(),
        )
    };
    let client = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| unreachable(&e))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| unreachable(&e))?;
            kube::Client::try_from(config).map_err(|e| unreachable(&e))?
        }
        None => kube::Client::try_default()
            .await
            .map_err(|e| unreachable(&e))?,
    };
    // Both at once: the runtime waits on this ADD, and a round trip to the API
    // server is most of what the plugin itself costs.
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let namespaces = Api::<Namespace>::all(client);
    let (pod, ns) = tokio::join!(pods.get(name), namespaces.get_opt(namespace));
    let pod = pod.map_err(|e| unreachable(&e))?;
    let ns = ns.map_err(|e| unreachable(&e))?;
    let selection = Selection {
        excluded_namespaces: cfg.exclude_namespaces.clone(),
        ztunnel_namespace: cfg.pod_namespace.clone(),
        ..Selection::default()
    };
    Ok((selection.decide(&pod, ns.as_ref()) == Verdict::Enroll).then_some(pod))
}

async fn ask_agent(cfg: &Config, request: &Request) -> Result<Response, CniError> {
    let unreachable = |e: String| {
        CniError::new(
            11,
            "the istio-cni agent is unreachable; an ambient pod cannot start uncaptured",
            format!("{}: {e}", cfg.agent_socket.display()),
        )
    };
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(&cfg.agent_socket).await?;
        let mut body = serde_json::to_vec(request)?;
        body.push(b'\n');
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        let mut reply = Vec::new();
        (&mut stream)
            .take(MAX_REPLY)
            .read_to_end(&mut reply)
            .await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(cfg.timeout_seconds), exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", cfg.timeout_seconds)))?
        .map_err(|e| unreachable(e.to_string()))?;
    let answer: Response = serde_json::from_slice(&reply).map_err(|e| {
        CniError::new(
            11,
            "malformed answer from the istio-cni agent",
            e.to_string(),
        )
    })?;
    event::check_answer_version(answer.version).map_err(|e| {
        CniError::new(
            11,
            "the istio-cni agent answered in a plugin-event version this plugin does not speak",
            e,
        )
    })?;
    Ok(answer)
}

/// The plugin's process: reads stdin and `CNI_*`, prints the result or the error.
pub fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    // A network config is a few KiB; more is cut, and then fails to parse.
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(std::io::stdin(), MAX_STDIN),
        &mut stdin,
    );
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!(
                "{}",
                CniError::new(5, "cannot start the plugin runtime", e.to_string()).to_json("1.0.0")
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&env, &stdin)) {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err((version, e)) => {
            println!("{}", e.to_json(&version));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_COMMAND".to_string(), cmd.to_string()),
            ("CNI_CONTAINERID".to_string(), "c1".to_string()),
            ("CNI_NETNS".to_string(), "/var/run/netns/x".to_string()),
            ("CNI_IFNAME".to_string(), "eth0".to_string()),
        ])
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","name":"net","type":"istio-cni","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]}}"#;

    #[tokio::test]
    async fn bad_input_is_a_cni_error_with_the_right_code() {
        let (_, e) = run(&env("ADD"), b"{not json").await.unwrap_err();
        assert_eq!(e.code, 6);
        let (_, e) = run(
            &env("ADD"),
            br#"{"cniVersion":"9.9.9","name":"n","type":"istio-cni"}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, 1);
        let mut no_netns = env("ADD");
        no_netns.remove("CNI_NETNS");
        let (_, e) = run(&no_netns, PREV.as_bytes()).await.unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_NETNS is not set"));
        let (_, e) = run(
            &env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni"}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.to_json("1.0.0").contains("\"code\":7"));
    }

    #[tokio::test]
    async fn non_kubernetes_pods_pass_through_and_version_answers() {
        let out = run(&env("ADD"), PREV.as_bytes()).await.unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["ips"][0]["address"], "10.0.0.5/24",
            "prevResult passed through"
        );
        let version = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#)
            .await
            .unwrap()
            .unwrap();
        assert!(version.contains("supportedVersions") && version.contains("1.1.0"));
        assert_eq!(run(&env("DEL"), PREV.as_bytes()).await.unwrap(), None);
    }

    #[test]
    fn result_ips_and_cni_args_parse() {
        let prev: Value =
            serde_json::from_str(r#"{"ips":[{"address":"10.0.0.5/24"},{"address":"fd00::5/64"}]}"#)
                .unwrap();
        assert_eq!(result_ips(&prev).len(), 2);
        let a = cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=sleep");
        assert_eq!(a["K8S_POD_NAME"], "sleep");
    }
}
