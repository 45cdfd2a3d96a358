//! ZDS messages: encoding and decoding an AddWorkload (with its netns fd, as ztunnel
//! receives it) and an Ack, and one whole Add → Ack exchange over a seqpacket socket
//! pair with the fd passed (SCM_RIGHTS), as between the agent and ztunnel.

use std::os::fd::{AsFd, OwnedFd};

use criterion::{criterion_group, criterion_main, Criterion};
use protocol::transport::Datagram;
use protocol::zds::WorkloadInfo;
use protocol::{Ack, Netns, Request, SeqpacketConn, WorkloadUid};

fn add(netns: &Netns) -> Request<&Netns> {
    Request::Add {
        uid: WorkloadUid::new("0c5bd3c8-7a9e-4bd4-9a53-1f0f1b2a3c4d"),
        info: WorkloadInfo {
            name: "httpbin-7d6c9b6f8-x2l4q".into(),
            namespace: "ambient-demo".into(),
            service_account: "httpbin".into(),
        },
        netns,
    }
}

fn own_netns_fd(netns: &Netns) -> OwnedFd {
    netns
        .as_fd()
        .try_clone_to_owned()
        .expect("dup of the netns fd")
}

fn bench(c: &mut Criterion) {
    let netns = Netns::current().expect("this process's netns");
    let bytes = add(&netns).encode();
    let ack = Ack::Ok.encode();
    let mut g = c.benchmark_group("zds");
    g.bench_function("encode AddWorkload", |b| b.iter(|| add(&netns).encode()));
    g.bench_function("decode AddWorkload (netns fd checked)", |b| {
        b.iter_batched(
            || Datagram {
                bytes: bytes.clone(),
                fd: Some(own_netns_fd(&netns)),
            },
            |d| Request::decode(d).expect("decodes"),
            // Few at a time: each holds an open fd.
            criterion::BatchSize::NumIterations(256),
        )
    });
    g.bench_function("encode + decode Ack", |b| {
        b.iter(|| {
            Ack::decode(Datagram {
                bytes: Ack::Ok.encode(),
                fd: None,
            })
            .expect("decodes")
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (agent, ztunnel) = rt
        .block_on(async { SeqpacketConn::pair() })
        .expect("socket pair");
    g.bench_function("Add with fd -> Ack over a socket pair", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = add(&netns);
                agent.send(&req.encode(), req.fd()).await.expect("send");
                let got = Request::decode(ztunnel.recv().await.expect("recv")).expect("decode");
                drop(got);
                ztunnel.send(&ack, None).await.expect("send ack");
                Ack::decode(agent.recv().await.expect("recv ack")).expect("ack")
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
