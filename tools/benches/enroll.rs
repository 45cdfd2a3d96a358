//! How fast the agent installs a pod's redirection: our one-`iptables-restore` apply
//! against the baseline of the `iptables` crate (one iptables process per rule, with a
//! `-C` check before each append to stay idempotent), on fresh network namespaces in
//! the same run. Also the full apply (rules + policy route), the periodic drift check of
//! an intact pod, and the removal. Root only.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use istio_cni::rules::{render, Family, Iptables, Redirection, RuleConfig};
use protocol::Netns;

/// A new, empty network namespace with `lo` up; it vanishes when the handle drops.
fn fresh_netns() -> Netns {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns (root?)");
        let ns = Netns::current().expect("open new netns");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(up.success());
        ns
    })
    .join()
    .expect("netns thread")
}

fn iptables() -> Iptables {
    Iptables {
        backend: istio_cni::rules::Backend::detect().expect("iptables backend"),
        lock_wait: Duration::from_secs(5),
    }
}

/// The baseline: the design card's `iptables` crate, rule by rule.
fn apply_with_crate(netns: &Netns) {
    let ruleset = render(&RuleConfig::default(), Family::V4);
    netns
        .run(|| {
            let ipt = iptables::new(false).expect("iptables crate");
            for t in &ruleset.tables {
                for chain in &t.chains {
                    ipt.new_chain(t.table, chain).expect("new chain");
                }
                for rule in t.jumps.iter().chain(&t.rules) {
                    let mut words = rule.splitn(3, ' ');
                    let (_, chain, spec) = (words.next(), words.next(), words.next());
                    ipt.append_unique(t.table, chain.expect("chain"), spec.expect("spec"))
                        .expect("append");
                }
            }
        })
        .expect("run in netns");
}

fn bench(c: &mut Criterion) {
    assert!(nix::unistd::geteuid().is_root(), "benchmarks need root");
    let v4 = Redirection::new(RuleConfig::default(), iptables(), &[Family::V4]);
    let redirection = Redirection::new(RuleConfig::default(), iptables(), &Family::ALL);
    let mut group = c.benchmark_group("install rules in a fresh pod netns");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));

    // Each timed run gets its own fresh netns, made outside the timing.
    let timed = |iters: u64, f: &dyn Fn(&Netns)| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let ns = fresh_netns();
            let start = Instant::now();
            f(&ns);
            total += start.elapsed();
        }
        total
    };
    group.bench_function("baseline: iptables crate, process per rule", |b| {
        b.iter_custom(|iters| timed(iters, &apply_with_crate))
    });
    group.bench_function("ours: one iptables-restore (rules only)", |b| {
        b.iter_custom(|iters| {
            timed(iters, &|ns| {
                let ipt = iptables();
                let saved = ipt.save(ns, Family::V4).expect("save");
                let input = istio_cni::rules::iptables::apply_input(
                    &render(&RuleConfig::default(), Family::V4),
                    &saved,
                );
                ipt.restore(ns, Family::V4, &input).expect("restore");
            })
        })
    });
    group.bench_function("ours: full apply, IPv4 (rules + policy route)", |b| {
        b.iter_custom(|iters| {
            timed(iters, &|ns| {
                v4.apply(ns).expect("apply");
            })
        })
    });
    group.bench_function("ours: full apply, IPv4 and IPv6", |b| {
        b.iter_custom(|iters| {
            timed(iters, &|ns| {
                redirection.apply(ns).expect("apply");
            })
        })
    });
    group.bench_function("ours: re-apply when already in place (no writes)", |b| {
        let ns = fresh_netns();
        redirection.apply(&ns).expect("apply");
        b.iter(|| redirection.apply(&ns).expect("apply"))
    });
    group.bench_function(
        "ours: drift check of an intact pod (verify, both families)",
        |b| {
            let ns = fresh_netns();
            redirection.apply(&ns).expect("apply");
            b.iter(|| assert!(redirection.verify(&ns).expect("verify").is_clean()))
        },
    );
    group.bench_function("ours: remove + conntrack flush", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let ns = fresh_netns();
                redirection.apply(&ns).expect("apply");
                let start = Instant::now();
                redirection.remove(&ns).expect("remove");
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
