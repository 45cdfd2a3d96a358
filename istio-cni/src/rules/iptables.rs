//! The iptables backend (legacy or nft) and the `iptables-restore` inputs that apply and
//! remove our chains in one call per netns.
//!
//! Applying is one `iptables-restore --noflush`: it declares our chains (which, under
//! `--noflush`, creates them or flushes them if they exist), fills them, and adds only
//! the jumps that are missing, so applying twice leaves one copy. Each table is
//! committed as a unit; if the restore fails part-way the caller rolls back.

use std::fmt::Write;
use std::time::Duration;

use protocol::Netns;

use super::render::{Family, Ruleset};
use super::save::{foreign_chains, parse_save, ForeignChain, SaveParseError, SavedTable};
use crate::exec::{self, ExecError};

/// Which iptables implementation to drive. Mixing them in one netns breaks both, so
/// the agent uses the one the host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    fn save_bin(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
        }
    }

    fn restore_bin(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
        }
    }

    /// Picks the backend holding the host's rules (the netns the agent runs in): the
    /// one with more rules, and on a tie whichever the distribution's `iptables` is.
    pub fn detect() -> Result<Backend, ExecError> {
        let count = |b: Backend| {
            exec::run(std::process::Command::new(b.save_bin(Family::V4)), None)
                .map(|out| out.lines().filter(|l| l.starts_with("-A ")).count())
        };
        let (legacy, nft) = (count(Backend::Legacy), count(Backend::Nft));
        match (legacy, nft) {
            (Ok(l), Ok(n)) if l > n => Ok(Backend::Legacy),
            (Ok(l), Ok(n)) if n > l => Ok(Backend::Nft),
            (Ok(_), Ok(_)) => {
                let version = exec::run(
                    {
                        let mut c = std::process::Command::new("iptables");
                        c.arg("--version");
                        c
                    },
                    None,
                )?;
                Ok(if version.contains("legacy") {
                    Backend::Legacy
                } else {
                    Backend::Nft
                })
            }
            (Ok(_), Err(_)) => Ok(Backend::Legacy),
            (Err(_), Ok(_)) => Ok(Backend::Nft),
            (Err(e), Err(_)) => Err(e),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "legacy" => Ok(Backend::Legacy),
            "nft" => Ok(Backend::Nft),
            other => Err(format!(
                "unknown iptables backend {other:?} (legacy or nft)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Parse(#[from] SaveParseError),
}

/// Runs iptables-save / iptables-restore (or their ip6tables twins) inside a netns.
#[derive(Clone, Debug)]
pub struct Iptables {
    pub backend: Backend,
    /// How long to wait for the xtables lock (legacy shares `/run/xtables.lock`).
    pub lock_wait: Duration,
}

impl Iptables {
    pub fn save(&self, netns: &Netns, family: Family) -> Result<Vec<SavedTable>, IptablesError> {
        let cmd = exec::in_netns(netns, self.backend.save_bin(family));
        Ok(parse_save(&exec::run(cmd, None)?)?)
    }

    pub fn restore(&self, netns: &Netns, family: Family, input: &str) -> Result<(), IptablesError> {
        let mut cmd = exec::in_netns(netns, self.backend.restore_bin(family));
        cmd.arg("--noflush")
            .arg("--wait")
            .arg(self.lock_wait.as_secs().max(1).to_string());
        exec::run(cmd, Some(input))?;
        Ok(())
    }
}

fn count(table: Option<&SavedTable>, rule: &str) -> usize {
    table.map_or(0, |t| t.rules.iter().filter(|r| *r == rule).count())
}

/// The lines that take foreign `ISTIO_*` chains out of table `table`: the jumps to
/// them, then their rules, then the chains.
fn foreign_lines(foreign: &[ForeignChain], table: &str) -> String {
    let mut out = String::new();
    let here: Vec<&ForeignChain> = foreign.iter().filter(|f| f.table == table).collect();
    for f in &here {
        for jump in &f.jumps {
            let _ = writeln!(out, "-D{}", &jump[2..]);
        }
    }
    for f in &here {
        let _ = writeln!(out, "-F {}", f.chain);
    }
    for f in &here {
        let _ = writeln!(out, "-X {}", f.chain);
    }
    out
}

/// Sections for tables we write nothing to but that hold foreign chains.
fn foreign_only_tables(want: &Ruleset, foreign: &[ForeignChain]) -> String {
    let mut out = String::new();
    let mut tables: Vec<&str> = foreign
        .iter()
        .map(|f| f.table.as_str())
        .filter(|t| !want.tables.iter().any(|w| w.table == *t))
        .collect();
    tables.dedup();
    for table in tables {
        let _ = write!(out, "*{table}\n{}COMMIT\n", foreign_lines(foreign, table));
    }
    out
}

/// The restore input that brings `current` to exactly `want`.
pub fn apply_input(want: &Ruleset, current: &[SavedTable]) -> String {
    let mut out = String::new();
    let foreign = foreign_chains(want, current);
    out.push_str(&foreign_only_tables(want, &foreign));
    for t in &want.tables {
        let have = current.iter().find(|s| s.name == t.table);
        let _ = writeln!(out, "*{}", t.table);
        out.push_str(&foreign_lines(&foreign, t.table));
        for chain in &t.chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for jump in &t.jumps {
            match count(have, jump) {
                0 => {
                    let _ = writeln!(out, "{jump}");
                }
                n => {
                    for _ in 1..n {
                        let _ = writeln!(out, "-D{}", &jump[2..]);
                    }
                }
            }
        }
        for rule in &t.rules {
            let _ = writeln!(out, "{rule}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The restore input that removes every trace of `want` from `current`, and any
/// other agent's `ISTIO_*` chains, touching nothing else. Empty when there is nothing
/// to remove.
pub fn remove_input(want: &Ruleset, current: &[SavedTable]) -> String {
    let foreign = foreign_chains(want, current);
    let mut out = foreign_only_tables(want, &foreign);
    for t in &want.tables {
        let Some(have) = current.iter().find(|s| s.name == t.table) else {
            continue;
        };
        let mut body = foreign_lines(&foreign, t.table);
        for jump in &t.jumps {
            for _ in 0..count(Some(have), jump) {
                let _ = writeln!(body, "-D{}", &jump[2..]);
            }
        }
        for chain in t.chains.iter().filter(|c| have.has_chain(c)) {
            let _ = writeln!(body, "-F {chain}\n-X {chain}");
        }
        if !body.is_empty() {
            let _ = write!(out, "*{}\n{body}COMMIT\n", t.table);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::render::{render, Family, RuleConfig};

    #[test]
    fn apply_on_an_empty_netns_adds_everything_once() {
        let want = render(&RuleConfig::default(), Family::V4);
        let input = apply_input(&want, &[]);
        assert_eq!(input.matches("-A PREROUTING -j ISTIO_PRERT").count(), 1);
        assert_eq!(input.matches("-A OUTPUT -j ISTIO_OUTPUT").count(), 2);
        assert_eq!(input.matches("COMMIT").count(), 2);
        assert!(!input.contains("-D "));
    }

    /// What Istio's agent (1.31-dev) leaves in a pod beside the specification's rules:
    /// a nat `ISTIO_PRERT` redirecting inbound TCP to 15006, found on the real cluster
    /// after migrating from Istio's chart; and, for the test, a raw-table chain.
    const ISTIO_EXTRAS: &str = "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m udp --dport 53 -j CT --zone 8
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -j ACCEPT
-A POSTROUTING -p tcp -m mark --mark 0x1 -j ISTIO_PRERT
COMMIT
";

    #[test]
    fn another_agents_istio_chains_are_drift_and_taken_out_with_their_jumps() {
        let want = render(&RuleConfig::default(), Family::V4);
        let current = parse_save(ISTIO_EXTRAS).unwrap();
        let foreign = foreign_chains(&want, &current);
        let names: Vec<(String, String)> = foreign
            .iter()
            .map(|f| (f.table.clone(), f.chain.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("raw".to_string(), "ISTIO_OUTPUT".to_string()),
                ("nat".to_string(), "ISTIO_PRERT".to_string())
            ]
        );
        assert_eq!(
            foreign[1].jumps,
            [
                "-A PREROUTING -j ISTIO_PRERT",
                "-A POSTROUTING -p tcp -m mark --mark 0x1 -j ISTIO_PRERT"
            ]
        );
        let drift = super::super::save::drift(&want, &current);
        assert!(
            drift
                .extra
                .contains(&"nat: chain ISTIO_PRERT is not ours".to_string()),
            "{drift}"
        );

        let input = apply_input(&want, &current);
        let nat = &input[input.find("*nat").unwrap()..];
        let nat = &nat[..nat.find("COMMIT").unwrap()];
        for line in [
            "-D PREROUTING -j ISTIO_PRERT",
            "-D POSTROUTING -p tcp -m mark --mark 0x1 -j ISTIO_PRERT",
            "-F ISTIO_PRERT",
            "-X ISTIO_PRERT",
        ] {
            assert!(nat.contains(line), "{line} not in:\n{nat}");
        }
        // Ours in nat (ISTIO_OUTPUT) is rewritten, not removed.
        assert!(!nat.contains("-X ISTIO_OUTPUT"));
        // The raw table, where we write nothing, gets a section of its own.
        assert!(
            input.starts_with(
                "*raw\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
            ),
            "{input}"
        );
        // Removal (the pod opted out) takes them too.
        let removal = remove_input(&want, &current);
        assert!(
            removal.contains("-X ISTIO_PRERT") && removal.contains("*raw"),
            "{removal}"
        );
    }

    #[test]
    fn on_the_node_other_istio_chains_are_left_alone() {
        let host = crate::rules::render::render_host_probe(
            &RuleConfig::default(),
            Family::V4,
            "istio-inpod-probes-v4",
        );
        let current = parse_save(ISTIO_EXTRAS).unwrap();
        assert!(foreign_chains(&host, &current).is_empty());
        let input = apply_input(&host, &current);
        assert!(
            !input.contains("ISTIO_PRERT") && !input.contains("*raw"),
            "{input}"
        );
    }

    #[test]
    fn apply_over_existing_rules_adds_no_second_jump_and_drops_duplicates() {
        let want = render(&RuleConfig::default(), Family::V4);
        let mut current =
            parse_save(include_str!("../../testdata/spec-iptables-save.txt")).unwrap();
        current[0].rules.push("-A PREROUTING -j ISTIO_PRERT".into());
        let input = apply_input(&want, &current);
        assert!(!input.contains("-A PREROUTING -j ISTIO_PRERT"));
        assert!(!input.contains("-A OUTPUT -j ISTIO_OUTPUT"));
        assert_eq!(input.matches("-D PREROUTING -j ISTIO_PRERT").count(), 1);
        // Our chains are re-declared (flushed) and refilled.
        assert!(input.contains(":ISTIO_PRERT - [0:0]"));
    }

    #[test]
    fn remove_touches_only_what_exists() {
        let want = render(&RuleConfig::default(), Family::V4);
        assert_eq!(remove_input(&want, &[]), "");
        let current = parse_save(include_str!("../../testdata/spec-iptables-save.txt")).unwrap();
        let input = remove_input(&want, &current);
        assert_eq!(
            input,
            "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n\
             -F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\n-F ISTIO_PRERT\n-X ISTIO_PRERT\nCOMMIT\n\
             *nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }
}
