//! The agent's pure rule work for one pod: rendering the ruleset, computing the
//! `iptables-restore` input against what is in place, parsing `iptables-save` output
//! and the drift check of an intact pod. (Installing rules for real, with the
//! processes it spawns, is in `cargo xtask bench`: CNI ADD → enrolled.)

use criterion::{criterion_group, criterion_main, Criterion};
use istio_cni::rules::iptables::apply_input;
use istio_cni::rules::save::{drift, parse_save};
use istio_cni::rules::{render, Family, RuleConfig};

fn bench(c: &mut Criterion) {
    let cfg = RuleConfig::default();
    let want = render(&cfg, Family::V4);
    // What `iptables-save` prints once the rules are in: the restore input is in the
    // same format.
    let saved_text = apply_input(&want, &[]);
    let saved = parse_save(&saved_text).expect("the restore input parses as a save");
    assert!(drift(&want, &saved).is_clean());
    let mut g = c.benchmark_group("rules");
    g.bench_function("render (IPv4)", |b| b.iter(|| render(&cfg, Family::V4)));
    g.bench_function("restore input for an empty pod", |b| {
        b.iter(|| apply_input(&want, &[]))
    });
    g.bench_function("parse iptables-save of a captured pod", |b| {
        b.iter(|| parse_save(&saved_text).expect("parses"))
    });
    g.bench_function(
        "drift check of an intact pod (render + parse + diff)",
        |b| {
            b.iter(|| {
                let want = render(&cfg, Family::V4);
                let saved = parse_save(&saved_text).expect("parses");
                drift(&want, &saved).is_clean()
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
