//! What ztunnel costs on the data path, measured against the direct path in the same
//! run: pod-to-pod bulk throughput and connection rate between two pods that are not
//! enrolled (baseline) and two that are (each byte crosses the client's ztunnel
//! outbound and the server's ztunnel inbound). Real netns on a CNI bridge, ztunnel as
//! a release build.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use e2e::app::connect;
use e2e::{TestNode, TestPod, Ztunnel};
use istio_cni::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const BULK: usize = 16 << 20;
const T: Duration = Duration::from_secs(10);

/// A sink in `pod`: reads to EOF, answers with one byte.
async fn sink(pod: &TestPod, port: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let std_listener = pod
        .netns()
        .run(move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k").await;
            });
        }
    });
    (SocketAddr::new(pod.ip, port), task)
}

async fn transfer(from: &TestPod, to: SocketAddr, bytes: usize) {
    let mut s = connect(from, to, T).await.expect("connect");
    let chunk = vec![7u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.expect("write");
        left -= n;
    }
    s.shutdown().await.expect("shutdown");
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.expect("ack");
}

fn bench(c: &mut Criterion) {
    assert!(nix::unistd::geteuid().is_root(), "benchmarks need root");
    let rt = Runtime::new().unwrap();
    let node = TestNode::new(90);
    // Separate pod pairs for the two paths: each connection leaves a TIME_WAIT entry in
    // the client pod's port space (two through ztunnel, whose upstream socket lives in
    // the pod too), so sharing one client pod would bias the second measurement.
    let (direct_client, direct_server) =
        (node.add_pod("direct-client"), node.add_pod("direct-server"));
    let (mesh_client, mesh_server) = (node.add_pod("mesh-client"), node.add_pod("mesh-server"));
    let (direct_dst, _s1) = rt.block_on(sink(&direct_server, 9000));
    let (mesh_dst, _s2) = rt.block_on(sink(&mesh_server, 9000));

    let agent = rt.block_on(Agent::start(node.agent_config(), &[])).unwrap();
    let _zt = Ztunnel::start(&node, 1);
    rt.block_on(async {
        agent.enroller().server().wait_for_connections(1).await;
        for p in [&mesh_client, &mesh_server] {
            agent.enroller().enroll(&p.pod()).await.expect("enroll");
        }
    });

    let run = |from: &TestPod, dst: SocketAddr, iters: u64, bytes: usize| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                transfer(from, dst, bytes).await;
            }
            start.elapsed()
        })
    };

    let mut bulk = c.benchmark_group("pod-to-pod bulk 16MiB");
    bulk.throughput(Throughput::Bytes(BULK as u64))
        .sample_size(10);
    bulk.bench_function("baseline: direct", |b| {
        b.iter_custom(|i| run(&direct_client, direct_dst, i, BULK))
    });
    bulk.bench_function("through ztunnel (both sides)", |b| {
        b.iter_custom(|i| run(&mesh_client, mesh_dst, i, BULK))
    });
    bulk.finish();

    let mut conns = c.benchmark_group("pod-to-pod connection (connect, 1 byte, close)");
    conns
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    conns.bench_function("baseline: direct", |b| {
        b.iter_custom(|i| run(&direct_client, direct_dst, i, 1))
    });
    conns.bench_function("through ztunnel (both sides)", |b| {
        b.iter_custom(|i| run(&mesh_client, mesh_dst, i, 1))
    });
    conns.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
