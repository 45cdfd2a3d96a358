//! The shortened fault matrix (`cargo xtask chaos --short`): every gated fault once,
//! with few probes. It fails on any non-zero must-be-0 column (plaintext bytes,
//! inbound bypass, crashes, leaks). Root only. The full matrix is `cargo xtask chaos`.

use std::process::Command;

#[test]
fn the_short_fault_matrix_finds_no_bypass_crash_or_leak() {
    e2e::require_root();
    let out = Command::new(e2e::bin_path("chaos"))
        .arg("--short")
        .output()
        .expect("run chaos");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("every must-be-0 column is 0"), "{text}");
    // Every gated fault ran: one row each.
    for fault in tools::chaos::Fault::ALL.iter().filter(|f| f.gated()) {
        assert!(
            text.contains(&format!("| {} |", fault.name())),
            "{} missing:\n{text}",
            fault.name()
        );
    }
}
