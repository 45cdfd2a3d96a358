//! ztunnel's per-connection state work at scale: finding the workload behind an
//! address among 100k workloads, finding one by uid, and deciding a connection under
//! 10k authorization policies that all apply to the destination. The state is built
//! through the index that xDS and the local file both fill (the file's parser caps
//! its input well below 100k workloads, on purpose).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use ztunnel::authz::{authorize, Conn, Decision};
use ztunnel::identity::Identity;
use ztunnel::state::policy::{Action, Match, Policy, PolicyKey, Scope, StringMatch};
use ztunnel::state::{Index, Protocol, Source, Uid, Workload, WorkloadEntry};

const WORKLOADS: usize = 100_000;
const POLICIES: usize = 10_000;

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

fn principal(p: &str) -> Match {
    Match {
        principals: vec![StringMatch::Exact(p.into())],
        ..Match::default()
    }
}

fn bench(c: &mut Criterion) {
    let mut index = Index::new(None);
    for i in 0..WORKLOADS {
        let uid = Uid::from(format!("Kubernetes//Pod/ns{}/w{i}", i % 100).as_str());
        let w = Workload {
            uid: uid.clone(),
            name: format!("w{i}"),
            namespace: format!("ns{}", i % 100),
            service_account: format!("sa{i}"),
            ips: vec![ip(i)],
            protocol: Protocol::Hbone,
            ..Workload::default()
        };
        index.set_workload(Source::Xds, uid, Some(WorkloadEntry::new(w, Vec::new())));
    }
    // Allow policies in the destination's namespace, none matching the client but
    // the last: every one is evaluated before the connection is allowed.
    for p in 0..POLICIES {
        let sa = if p == POLICIES - 1 {
            "client"
        } else {
            "nobody"
        };
        let policy = Policy {
            name: format!("p{p}"),
            namespace: "ns0".into(),
            scope: Scope::Namespace,
            action: Action::Allow,
            rules: vec![vec![vec![
                principal(&format!("cluster.local/ns/ns1/sa/{sa}{p}")),
                principal(&format!("cluster.local/ns/ns1/sa/{sa}")),
            ]]],
            dry_run: false,
        };
        index.set_policy(
            Source::Xds,
            PolicyKey::new("ns0", &policy.name),
            Some(Arc::new(policy)),
        );
    }
    let state = index.snapshot();
    assert_eq!(state.workload_count(), WORKLOADS);

    let mut g = c.benchmark_group("state");
    let probe = ip(WORKLOADS / 2 + 7);
    g.bench_function("workload by address (100k workloads)", |b| {
        b.iter(|| state.workload_at("", probe).expect("found"))
    });
    g.bench_function("workload by uid (100k workloads)", |b| {
        b.iter(|| state.workload("Kubernetes//Pod/ns7/w50007").expect("found"))
    });
    let dst = state.workload_at("", ip(0)).expect("w0").clone();
    let client = Identity {
        trust_domain: "cluster.local".into(),
        namespace: "ns1".into(),
        service_account: "client".into(),
    };
    let conn = Conn {
        src_ip: ip(1),
        src_identity: Some(&client),
        dst_ip: ip(0),
        dst_port: 8080,
    };
    assert_eq!(authorize(state.policies(), &dst, &conn), Decision::Allow);
    g.bench_function("authorize under 10k applicable policies", |b| {
        b.iter(|| authorize(state.policies(), &dst, &conn))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
