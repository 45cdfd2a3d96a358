//! `cargo xtask demo`: a local ambient node on this machine, with nothing faked but the
//! Kubernetes API server.
//!
//! A bridge network from the real CNI `bridge`, `host-local` and `loopback` plugins;
//! the node agent, which installs its plugin at the end of that chain; ztunnel with a
//! local CA; a namespace `ambient-demo` labelled ambient, and a `sleep` client pod and
//! an `httpbin` server pod started through the CNI chain as a container runtime would.
//! It then shows what the specification's "Observing" section shows, and a request
//! from sleep to httpbin over mTLS, ztunnel's metrics and `istio-cni diagnose`. With
//! `--keep` the node stays up, with a list of things to poke at, until Ctrl-C. Ctrl-C
//! or the end removes everything it created.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use e2e::cluster::{Cluster, AMBIENT};
use e2e::mesh_files::identity_of;
use e2e::{sh, Ztunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "ambient-demo";
const SUBNET_INDEX: u8 = 200;

fn step(text: &str) {
    println!("\n==> {text}");
}

/// The demo must run as root; the tools it runs are installed by `cargo xtask demo`
/// (see `xtask::setup`), which is how it is meant to be started.
fn prerequisites() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "the demo creates network namespaces and iptables rules: run it as root".into(),
        );
    }
    if !Path::new("/usr/lib/cni/bridge").exists() && std::env::var_os("CNI_PATH").is_none() {
        return Err(
            "no CNI plugins in /usr/lib/cni: start the demo with `cargo xtask demo`, \
                    which installs what it needs"
                .into(),
        );
    }
    Ok(())
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A tiny HTTP server in the httpbin pod.
async fn httpbin(pod: &e2e::TestPod, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .netns()
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            s.listen(64)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })??;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = format!("hello from httpbin; you are {}\n", peer.ip().to_canonical());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    }))
}

async fn demo(keep: bool) -> anyhow::Result<()> {
    step("Kubernetes API (the in-repo test server) and namespace ambient-demo, labelled istio.io/dataplane-mode=ambient");
    let cluster = Cluster::dual_stack(SUBNET_INDEX, false).await;
    cluster.namespace(NAMESPACE, &[AMBIENT]);
    println!("kubeconfig: {}", cluster.kubeconfig.display());

    step("The node's primary CNI config: bridge + host-local, dual-stack (a private conf dir)");
    let conf_dir = cluster.node.dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir)?;
    let primary = conf_dir.join("10-demo.conflist");
    std::fs::write(
        &primary,
        serde_json::to_vec_pretty(cluster.node.conflist())?,
    )?;
    println!("{}", primary.display());

    // The mesh's local config, as istiod would provide it: host-local hands out
    // addresses in order from fresh ranges, so the pods' addresses are known.
    let ips = |n: u8| [cluster.node.ip(n), cluster.node.ip6(n.into())];
    let yaml = |[s4, s6]: [IpAddr; 2], [h4, h6]: [IpAddr; 2]| {
        format!(
            "workloads:\n- {{uid: Kubernetes//Pod/{NAMESPACE}/sleep, name: sleep, namespace: {NAMESPACE}, serviceAccount: sleep, workloadName: sleep, canonicalName: sleep, node: {node}, workloadIps: [\"{s4}\", \"{s6}\"], protocol: HBONE, services: {{}}}}\n- {{uid: Kubernetes//Pod/{NAMESPACE}/httpbin, name: httpbin, namespace: {NAMESPACE}, serviceAccount: httpbin, workloadName: httpbin, canonicalName: httpbin, node: {node}, workloadIps: [\"{h4}\", \"{h6}\"], protocol: HBONE, services: {{}}}}\n",
            node = cluster.node.node_name()
        )
    };
    cluster.node.write_mesh_config(&yaml(ips(2), ips(3)));

    step("Node agent (istio-cni): installs its CNI plugin last in the chain, watches the API");
    let agent = cluster.start_agent(1);
    until("the agent chained its plugin", || {
        std::fs::read_to_string(&primary).is_ok_and(|c| c.contains("istio-cni"))
    })
    .await?;
    println!("{}", std::fs::read_to_string(&primary)?);

    step("ztunnel, with a local CA (ztunnel create-root) and the local config");
    let zt = Ztunnel::start_mesh(&cluster.node, 1, &[]);
    zt.wait_readiness(200).await;

    step("Pods sleep and httpbin, started through the CNI chain as a container runtime would");
    let cni_path = format!(
        "/usr/lib/cni:{}",
        cluster.node.dir.path().join("cni-bin").display()
    );
    std::env::set_var("CNI_PATH", cni_path);
    let installed: serde_json::Value = serde_json::from_slice(&std::fs::read(&primary)?)?;
    let mut pods = Vec::new();
    for (name, want) in [("sleep", ips(2)), ("httpbin", ips(3))] {
        cluster.create_pod_object(NAMESPACE, name);
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name}");
        let (pod, added) = cluster
            .node
            .add_pod_with_conflist(name, installed.clone(), &args);
        pods.push(pod);
        added
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("CNI ADD for {name}"))?;
        let pod = pods.last().context("pod")?;
        if pod.ips != want {
            bail!(
                "{name} got {:?} but the local config expects {want:?}",
                pod.ips
            );
        }
        let annotation = cluster
            .api
            .pod(NAMESPACE, name)
            .and_then(|p| p.metadata.annotations)
            .unwrap_or_default();
        println!(
            "{name}: {} (netns {}), ambient.istio.io/redirection={}",
            pod.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            pod.netns_name,
            annotation
                .get("ambient.istio.io/redirection")
                .map(String::as_str)
                .unwrap_or("-")
        );
    }
    let (sleep, httpbin_pod) = (&pods[0], &pods[1]);
    let _server = httpbin(httpbin_pod, 8000).await?;

    step("$ kubectl logs ds/ztunnel -n istio-system | grep inpod");
    for line in zt.logs().lines().filter(|l| l.contains("inpod")) {
        println!("{line}");
    }
    step("$ kubectl debug sleep ... -- ss -ntlp");
    print!("{}", sleep.exec(&["ss", "-ntlp"]));
    step("$ kubectl debug sleep ... -- iptables-save");
    print!("{}", sleep.exec(&["iptables-save"]));
    step("$ kubectl debug sleep ... -- ip6tables-save");
    print!("{}", sleep.exec(&["ip6tables-save"]));

    for ip in &httpbin_pod.ips {
        step(&format!(
            "sleep -> httpbin over {}: GET http://{}/",
            if ip.is_ipv4() { "IPv4" } else { "IPv6" },
            SocketAddr::new(*ip, 8000)
        ));
        let response = e2e::app::exchange(
            sleep,
            SocketAddr::new(*ip, 8000),
            "GET / HTTP/1.1\r\nhost: httpbin\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .context("request from sleep to httpbin")?;
        print!("{response}");
        if !response.contains("hello from httpbin") {
            bail!("unexpected response");
        }
    }
    let (src, dst_id) = (identity_of(sleep), identity_of(httpbin_pod));
    let src_field = format!("src.identity=\"{src}\"");
    let dst_field = format!("dst.identity=\"{dst_id}\"");
    zt.wait_for(&["access", &src_field, &dst_field], 4).await;
    step("ztunnel access log: the request went over mTLS (HBONE), both identities proven");
    for line in zt.logs().lines().filter(|l| l.contains(" access: ")) {
        println!("{line}");
    }

    let stats = zt.listening_addr("stats endpoint listening").await;
    step(&format!(
        "$ curl -s http://{stats}/stats/prometheus | grep istio_tcp_connections_opened_total"
    ));
    let (_, metrics) = e2e::http_get(stats, "/stats/prometheus").await;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
    {
        println!("{line}");
    }

    let monitoring = agent.listening_addr("monitoring endpoint listening").await;
    let debug = agent.listening_addr("debug endpoint listening").await;
    let istio_cni = e2e::bin_path("istio-cni");
    // ztunnel runs in the node's netns here, its admin on a free port: diagnose is
    // told where (in a cluster it enters ztunnel's pod netns to reach localhost:15000).
    let admin = zt.admin_addr().await;
    step(&format!(
        "$ istio-cni diagnose --agent {debug} --ztunnel-admin {admin}   (the quick checks, automated)"
    ));
    let out = std::process::Command::new(&istio_cni)
        .args(["diagnose", "--agent", &debug.to_string()])
        .args(["--ztunnel-admin", &admin.to_string()])
        .env_remove("CNI_COMMAND")
        .output()
        .context("running istio-cni diagnose")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("istio-cni diagnose found a problem");
    }

    if keep {
        let httpbin_ip = httpbin_pod.ip;
        step("The node keeps running (--keep). Things to try, as root in another shell:");
        println!(
            "  # a shell inside a pod's network namespace
  ip netns exec {sleep_ns} bash
  # sleep -> httpbin through ztunnel (HBONE, mTLS); compare the access log below
  ip netns exec {sleep_ns} curl -s http://{httpbin_ip}:8000/
  # what the pod sees: ztunnel's listeners and the redirection rules
  ip netns exec {sleep_ns} ss -ntlp
  ip netns exec {sleep_ns} iptables-save
  # ztunnel's admin API: config_dump, log levels, metrics
  curl -s http://{admin}/config_dump
  curl -s -X POST 'http://{admin}/logging?level=ztunnel::inpod=debug'
  curl -s http://{stats}/metrics
  # the agent: metrics and the automated quick checks
  curl -s http://{monitoring}/metrics
  {istio_cni} diagnose --agent {debug} --ztunnel-admin {admin}
  # logs
  tail -f {zt_log} {agent_log}

Ctrl-C removes everything.",
            sleep_ns = sleep.netns_name,
            istio_cni = istio_cni.display(),
            zt_log = zt.log_path().display(),
            agent_log = agent.log_path().display(),
        );
        std::future::pending::<()>().await;
    }
    step("Done; removing everything the demo created");
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if let Err(problem) = prerequisites() {
        eprintln!("{problem}");
        return ExitCode::from(2);
    }
    let keep = std::env::args().skip(1).any(|a| a == "--keep");
    if let Some(other) = std::env::args().skip(1).find(|a| a != "--keep") {
        eprintln!("unknown argument {other:?}; usage: demo [--keep]");
        return ExitCode::from(2);
    }
    let code = tokio::select! {
        r = demo(keep) => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted; removing everything the demo created");
            ExitCode::SUCCESS
        }
    };
    // Everything the demo made is owned by values dropped by now (pods: CNI DEL and
    // netns; the bridge; the processes; the host probe rules).
    let leftover = sh("ip", &["netns", "list"]);
    if leftover.contains(&format!("zt{SUBNET_INDEX}")) {
        eprintln!("warning: network namespaces left behind:\n{leftover}");
    }
    code
}
