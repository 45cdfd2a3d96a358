//! The benchmark's short form (`cargo xtask bench --short`): every measurement runs
//! end to end and lands in the table, the JSON and the chart. Figures from so short a
//! run on a debug build are not judged (performance is the benchmark's business, not
//! the suite's); what is checked is that each one was measured, plus the footprint
//! facts that do not depend on timing. Root only.

use tools::bench::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_benchmark_measures_every_figure_and_writes_its_reports() {
    e2e::require_root();
    let out = tempfile::tempdir().expect("temp dir");
    let report = bench::run(&Options::short(out.path().to_path_buf()))
        .await
        .expect("the benchmark runs");

    let row = |name: &str| {
        report
            .rows
            .iter()
            .find(|r| r.test.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name:?} in {:#?}", report.rows))
    };
    for name in [
        "iperf3, 1 stream",
        "iperf3, 4 streams",
        "CPU-s per GB, 1 stream",
        "request/response 64 B, unpinned, p50",
        "request/response 64 B, pinned to one CPU, p50",
        "connect + 1 round trip + close, unpinned, p50",
        "connect + 1 round trip + close, pinned to one CPU, p50",
        "ztunnel CPU per connection",
        "ztunnel RSS idle",
        "RSS per enrolled pod (30 pods)",
        "RSS after 30 pods left",
        "RSS growth over 2 add/delete cycles",
        "ZDS Add → ack, p50",
        "CNI ADD → enrolled, p99",
    ] {
        let r = row(name);
        assert!(
            r.ours.is_finite() && r.ours > 0.0,
            "{name}: no figure for ours: {r:?}"
        );
        if let Some(d) = r.direct {
            assert!(d.is_finite() && d > 0.0, "{name}: no direct figure: {r:?}");
        }
    }
    // Each enrolled pod holds its three listeners and its netns in ztunnel, nothing
    // more, and no thread.
    let fds = row("fds per enrolled pod (30 pods)").ours;
    assert!((3.5..=5.0).contains(&fds), "fds per pod: {fds}");
    assert_eq!(row("threads per enrolled pod (30 pods)").ours, 0.0);

    let md = std::fs::read_to_string(out.path().join("bench.md")).expect("bench.md");
    assert!(md.contains("| iperf3, 1 stream |") && md.contains("targets met."));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench.json")).expect("bench.json"),
    )
    .expect("bench.json is JSON");
    assert_eq!(
        json["rows"].as_array().map(Vec::len),
        Some(report.rows.len())
    );
    let svg = std::fs::read_to_string(out.path().join("bench.svg")).expect("bench.svg");
    let targets = report.rows.iter().filter(|r| r.target.is_some()).count();
    assert_eq!(svg.matches("<rect x=").count(), targets, "a bar per target");
}
