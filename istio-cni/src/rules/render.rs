//! The in-pod redirection ruleset, rendered as `iptables-save` lines. Pure: no I/O.
//!
//! Lines are rendered in exactly the canonical form `iptables-save` prints them, so the
//! same strings serve as `iptables-restore` input and as the expectation that drift
//! detection compares a live `iptables-save` against.

use std::net::Ipv4Addr;

/// Inbound chain (mangle PREROUTING).
pub const PRERT_CHAIN: &str = "ISTIO_PRERT";
/// Outbound chain (mangle and nat OUTPUT).
pub const OUTPUT_CHAIN: &str = "ISTIO_OUTPUT";

/// The numbers the rules are made of. Defaults are Istio's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleConfig {
    /// Mark on every socket ztunnel makes for a pod (1337): its traffic is never captured.
    pub ztunnel_mark: u32,
    /// Mark for redirected traffic: TPROXY'd packets and the connections ztunnel opens
    /// to the app, whose replies must be routed back to ztunnel.
    pub redirect_mark: u32,
    /// The bits of the packet mark these rules own.
    pub mark_mask: u32,
    /// Source address of kubelet probes after the host SNATs them.
    pub probe_ip: Ipv4Addr,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub inbound_hbone_port: u16,
    /// Policy-routing table holding `local 0.0.0.0/0 dev lo`.
    pub route_table: u32,
    /// Priority of the `fwmark … lookup <table>` rule.
    pub rule_priority: u32,
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            ztunnel_mark: 0x539,
            redirect_mark: 0x111,
            mark_mask: 0xfff,
            probe_ip: Ipv4Addr::new(169, 254, 7, 127),
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            inbound_hbone_port: 15008,
            route_table: 100,
            rule_priority: 32764,
        }
    }
}

/// Our part of one netfilter table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    /// Chains we own, created and deleted by us.
    pub chains: Vec<&'static str>,
    /// The jumps from built-in chains into ours (`-A PREROUTING -j ISTIO_PRERT`).
    pub jumps: Vec<String>,
    /// The rules of our chains, in order.
    pub rules: Vec<String>,
}

/// Everything we install with iptables, table by table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<TableRules>,
}

/// Renders the specification's ruleset for `cfg`.
pub fn render(cfg: &RuleConfig) -> Ruleset {
    let mask = cfg.mark_mask;
    let ztunnel = format!("0x{:x}/0x{mask:x}", cfg.ztunnel_mark);
    let redirect = format!("0x{:x}/0x{mask:x}", cfg.redirect_mark);
    let probe = format!("{}/32", cfg.probe_ip);
    let tproxy =
        |port: u16| format!("-j TPROXY --on-port {port} --on-ip 0.0.0.0 --tproxy-mark {redirect}");

    let mangle = TableRules {
        table: "mangle",
        chains: vec![OUTPUT_CHAIN, PRERT_CHAIN],
        jumps: vec![
            format!("-A PREROUTING -j {PRERT_CHAIN}"),
            format!("-A OUTPUT -j {OUTPUT_CHAIN}"),
        ],
        rules: vec![
            // Replies of connections ztunnel opened to the app carry the redirect mark,
            // so policy routing hands them back to ztunnel's transparent socket.
            format!(
                "-A {OUTPUT_CHAIN} -m connmark --mark {redirect} -j CONNMARK --restore-mark \
                 --nfmask 0xffffffff --ctmask 0xffffffff"
            ),
            format!("-A {PRERT_CHAIN} -m mark --mark {ztunnel} -j CONNMARK --set-xmark {redirect}"),
            format!("-A {PRERT_CHAIN} -s {probe} -p tcp -m tcp -j ACCEPT"),
            format!("-A {PRERT_CHAIN} ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT"),
            format!(
                "-A {PRERT_CHAIN} -p tcp -m tcp --dport {} -m mark ! --mark {ztunnel} {}",
                cfg.inbound_hbone_port,
                tproxy(cfg.inbound_hbone_port)
            ),
            format!("-A {PRERT_CHAIN} -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            format!(
                "-A {PRERT_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {ztunnel} {}",
                tproxy(cfg.inbound_plaintext_port)
            ),
        ],
    };
    let nat = TableRules {
        table: "nat",
        chains: vec![OUTPUT_CHAIN],
        jumps: vec![format!("-A OUTPUT -j {OUTPUT_CHAIN}")],
        rules: vec![
            format!("-A {OUTPUT_CHAIN} -d {probe} -p tcp -m tcp -j ACCEPT"),
            format!("-A {OUTPUT_CHAIN} -p tcp -m mark --mark {redirect} -j ACCEPT"),
            format!("-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -o lo -j ACCEPT"),
            format!(
                "-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {ztunnel} \
                 -j REDIRECT --to-ports {}",
                cfg.outbound_port
            ),
        ],
    };
    Ruleset {
        tables: vec![mangle, nat],
    }
}

/// Host netns chain for kubelet probes.
pub const POSTRT_CHAIN: &str = "ISTIO_POSTRT";

/// The host-side rule for kubelet probes: locally originated TCP to an enrolled pod's IP
/// (a member of `set`) is SNATed to the probe address, which the pod's rules let
/// straight through to the app instead of capturing it.
pub fn render_host_probe(cfg: &RuleConfig, set: &str) -> Ruleset {
    Ruleset {
        tables: vec![TableRules {
            table: "nat",
            chains: vec![POSTRT_CHAIN],
            jumps: vec![format!("-A POSTROUTING -j {POSTRT_CHAIN}")],
            rules: vec![format!(
                "-A {POSTRT_CHAIN} -p tcp -m owner --socket-exists -m set --match-set {set} dst \
                 -j SNAT --to-source {}",
                cfg.probe_ip
            )],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::save::parse_save;

    const SPEC: &str = include_str!("../../testdata/spec-iptables-save.txt");

    #[test]
    fn default_ruleset_is_exactly_the_specifications() {
        let spec = parse_save(SPEC).unwrap();
        let ours = render(&RuleConfig::default());
        assert_eq!(spec.len(), ours.tables.len());
        for table in &ours.tables {
            let saved = spec.iter().find(|t| t.name == table.table).unwrap();
            let mut expected: Vec<&str> = table.jumps.iter().map(String::as_str).collect();
            expected.extend(table.rules.iter().map(String::as_str));
            let got: Vec<&str> = saved.rules.iter().map(String::as_str).collect();
            assert_eq!(got, expected, "table {}", table.table);
            let user_chains: Vec<&str> = saved
                .chains
                .iter()
                .filter(|c| c.policy == "-")
                .map(|c| c.name.as_str())
                .collect();
            assert_eq!(user_chains, table.chains, "table {}", table.table);
        }
    }

    #[test]
    fn numbers_come_from_the_config() {
        let cfg = RuleConfig {
            ztunnel_mark: 0x123,
            outbound_port: 25001,
            ..RuleConfig::default()
        };
        let nat = &render(&cfg).tables[1];
        assert!(nat.rules[3].ends_with("! --mark 0x123/0xfff -j REDIRECT --to-ports 25001"));
    }
}
