//! A large mesh over xDS: the control-plane test server pushes `XDS_SCALE_WORKLOADS`
//! workloads (default 100,000) spread over `XDS_SCALE_SERVICES` services (default
//! 10,000) to a release ztunnel, in one response. Reported: the time from the push to
//! ztunnel's ACK (the state applied and swapped in), the time of a one-workload update
//! once all are held (what every later push costs), and ztunnel's resident memory per
//! workload (the growth over its RSS with an empty mesh, measured in the same run).
//! Goal: ≤ 1 s and ≤ 1 KB per workload. Root only (a test node for the mesh files).

use std::time::{Duration, Instant};

use e2e::{TestNode, Ztunnel};
use standins::controlplane::{ip_bytes, ControlPlane, ADDRESS_TYPE};
use ztunnel::proto::istio::workload as xwl;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    tools::bench::procfs::rss_bytes(pid).map_or(0, |b| b / 1024)
}

fn workload(i: usize, services: usize) -> xwl::Workload {
    let ns = format!("ns-{}", i % 100);
    let svc = i % services;
    let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
    xwl::Workload {
        uid: format!("Kubernetes//Pod/{ns}/pod-{i}"),
        name: format!("pod-{i}"),
        namespace: ns.clone(),
        service_account: format!("sa-{}", i % 1000),
        addresses: vec![ip_bytes(ip.into())],
        node: format!("node-{}", i % 1000),
        tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
        workload_name: format!("deploy-{svc}"),
        canonical_name: format!("app-{svc}"),
        canonical_revision: "v1".into(),
        cluster_id: "Kubernetes".into(),
        services: [(
            format!(
                "ns-{}/svc-{svc}.ns-{}.svc.cluster.local",
                svc % 100,
                svc % 100
            ),
            xwl::PortList {
                ports: vec![xwl::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn service(i: usize) -> xwl::Service {
    let ns = format!("ns-{}", i % 100);
    let vip = std::net::Ipv4Addr::from(0x6400_0000u32 + i as u32 + 1);
    xwl::Service {
        name: format!("svc-{i}"),
        namespace: ns.clone(),
        hostname: format!("svc-{i}.{ns}.svc.cluster.local"),
        addresses: vec![xwl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip.into()),
        }],
        ports: vec![xwl::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    }
}

/// Waits until ztunnel has ACKed `n` Address responses; returns when it did.
async fn acked(cp: &ControlPlane, n: usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let acks = cp
            .requests()
            .iter()
            .filter(|r| r.type_url == ADDRESS_TYPE && !r.response_nonce.is_empty())
            .count();
        if acks >= n {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "ztunnel never ACKed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "benchmarks need root");
    let workloads = env_count("XDS_SCALE_WORKLOADS", 100_000);
    let services = env_count("XDS_SCALE_SERVICES", 10_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let node = TestNode::new(199);
        let cp = node.control_plane().await;
        let env = cp.env();
        let zt = Ztunnel::start_with(&node, 1, |cmd| {
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd.env("RUST_LOG", "ztunnel::xds=info,warn");
        });
        let first = acked(&cp, 1).await;
        let _ = first;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let empty = rss_kib(zt.pid());

        // Encoded beforehand: what is timed is ztunnel's work (and the transfer).
        let encode = |t: xwl::address::Type| prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: prost::Message::encode_to_vec(&xwl::Address { r#type: Some(t) }),
        };
        let ss: Vec<_> = (0..services)
            .map(|i| {
                let s = service(i);
                (
                    format!("{}/{}", s.namespace, s.hostname),
                    encode(xwl::address::Type::Service(s)),
                )
            })
            .collect();
        let ws: Vec<_> = (0..workloads)
            .map(|i| {
                let w = workload(i, services);
                (w.uid.clone(), encode(xwl::address::Type::Workload(w)))
            })
            .collect();
        let pushed = Instant::now();
        cp.push_raw(ADDRESS_TYPE, ss);
        cp.push_raw(ADDRESS_TYPE, ws);
        let done = acked(&cp, 3).await;
        let apply = done - pushed;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let full = rss_kib(zt.pid());

        let mut one = workload(0, services);
        one.canonical_revision = "v2".into();
        let pushed = Instant::now();
        cp.push_workloads(&[one]);
        let update = acked(&cp, 4).await - pushed;

        let per_workload = (full.saturating_sub(empty) as f64 * 1024.0) / workloads as f64;
        println!("xds_scale: {workloads} workloads, {services} services (one response each)");
        println!(
            "  apply (push to ACK):            {:>8.0} ms   (goal <= 1000 ms)",
            apply.as_secs_f64() * 1e3
        );
        println!(
            "  one-workload update afterwards: {:>8.1} ms",
            update.as_secs_f64() * 1e3
        );
        println!("  RSS empty mesh:                 {empty:>8} KiB");
        println!("  RSS with the mesh:              {full:>8} KiB");
        println!("  RSS per workload:               {per_workload:>8.0} B    (goal <= 1024 B)");
        for line in zt
            .logs()
            .lines()
            .filter(|l| l.contains("xDS update applied"))
        {
            println!(
                "  ztunnel: {}",
                line.split("INFO").nth(1).unwrap_or(line).trim()
            );
        }
        drop(zt);
    });
}
