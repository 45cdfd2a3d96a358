//! What ztunnel costs on the data path, against the direct path measured in the same
//! run: pod-to-pod bulk throughput and connection rate between pods that are not
//! enrolled (the baseline), pods enrolled as plain TCP workloads (passthrough out,
//! 15006 in), and mesh pods (HBONE: HTTP/2 CONNECT over mTLS between the two sides).
//! Real netns on a CNI bridge, ztunnel as a release build.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use e2e::app::connect;
use e2e::mesh_files::workload;
use e2e::{Mesh, TestNode, TestPod};
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
    let node = TestNode::new(190);
    // A pod pair per path: each connection leaves TIME_WAIT entries in the client
    // pod's port space (two through ztunnel, whose upstream socket lives in the pod
    // too), so sharing a client pod would bias whichever path is measured later.
    let pairs = [
        ("direct", node.add_pod("d-client"), node.add_pod("d-server")),
        (
            "through ztunnel, plaintext",
            node.add_pod("p-client"),
            node.add_pod("p-server"),
        ),
        (
            "through ztunnel, HBONE (mTLS)",
            node.add_pod("h-client"),
            node.add_pod("h-server"),
        ),
    ];
    let workloads: String = [
        workload(&pairs[1].1, "TCP", ""),
        workload(&pairs[1].2, "TCP", ""),
        workload(&pairs[2].1, "HBONE", ""),
        workload(&pairs[2].2, "HBONE", ""),
    ]
    .concat();
    node.write_mesh_config(&format!("workloads:\n{workloads}"));
    let enrolled: Vec<&TestPod> = pairs[1..].iter().flat_map(|(_, c, s)| [c, s]).collect();
    let _mesh = rt.block_on(Mesh::start_in_mesh(&node, &enrolled, &[]));
    let sinks: Vec<_> = pairs
        .iter()
        .map(|(_, _, server)| rt.block_on(sink(server, 9000)))
        .collect();

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
    for ((name, client, _), (dst, _)) in pairs.iter().zip(&sinks) {
        bulk.bench_function(*name, |b| b.iter_custom(|i| run(client, *dst, i, BULK)));
    }
    bulk.finish();

    let mut conns = c.benchmark_group("pod-to-pod connection (connect, 1 byte, close)");
    conns
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for ((name, client, _), (dst, _)) in pairs.iter().zip(&sinks) {
        conns.bench_function(*name, |b| b.iter_custom(|i| run(client, *dst, i, 1)));
    }
    conns.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
