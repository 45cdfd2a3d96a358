//! The in-pod redirection ruleset, rendered as `iptables-save` lines. Pure: no I/O.
//!
//! Lines are rendered in exactly the canonical form `iptables-save` prints them, so the
//! same strings serve as `iptables-restore` input and as the expectation that drift
//! detection compares a live `iptables-save` against.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Inbound chain (mangle PREROUTING).
pub const PRERT_CHAIN: &str = "ISTIO_PRERT";
/// Outbound chain (mangle and nat OUTPUT).
pub const OUTPUT_CHAIN: &str = "ISTIO_OUTPUT";

/// An address family: the rules, routes, sets and conntrack entries of each are
/// separate kernel objects, rendered and applied one family at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The loopback network, as `iptables-save` prints it.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The unspecified address.
    pub fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }

    /// The host route covering every address (`0.0.0.0/0`, `::/0`).
    pub fn everything(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    /// `-4` / `-6` for `ip`.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The suffix of per-family names (`-v4`, `-v6`).
    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

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
    /// The same for probes over IPv6.
    pub probe_ip6: Ipv6Addr,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub inbound_hbone_port: u16,
    /// Policy-routing table holding `local 0.0.0.0/0 dev lo`.
    pub route_table: u32,
    /// Priority of the `fwmark … lookup <table>` rule.
    pub rule_priority: u32,
}

impl RuleConfig {
    /// The probe source address of `family`.
    pub fn probe(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.probe_ip.into(),
            Family::V6 => self.probe_ip6.into(),
        }
    }

    /// The probe source, as a host network in `iptables-save` form.
    fn probe_net(&self, family: Family) -> String {
        match family {
            Family::V4 => format!("{}/32", self.probe_ip),
            Family::V6 => format!("{}/128", self.probe_ip6),
        }
    }
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            ztunnel_mark: 0x539,
            redirect_mark: 0x111,
            mark_mask: 0xfff,
            probe_ip: Ipv4Addr::new(169, 254, 7, 127),
            probe_ip6: Ipv6Addr::new(
                0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
            ),
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

/// Everything we install with iptables (or ip6tables, per `family`), table by table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub tables: Vec<TableRules>,
    /// Whether every `ISTIO_*` chain where these rules go is the redirection's (a
    /// pod's netns: another agent's are drift, see [`super::save::foreign_chains`]),
    /// or only ours are (the node's netns, shared with everything else).
    pub owns_istio_chains: bool,
}

/// Renders the specification's ruleset for `cfg`: for IPv4 exactly the
/// specification's `iptables-save`; for IPv6 the same rules for ip6tables, with the
/// IPv6 loopback and probe address.
pub fn render(cfg: &RuleConfig, family: Family) -> Ruleset {
    let mask = cfg.mark_mask;
    let ztunnel = format!("0x{:x}/0x{mask:x}", cfg.ztunnel_mark);
    let redirect = format!("0x{:x}/0x{mask:x}", cfg.redirect_mark);
    let probe = cfg.probe_net(family);
    let lo = family.loopback();
    let any = family.any();
    let tproxy =
        |port: u16| format!("-j TPROXY --on-port {port} --on-ip {any} --tproxy-mark {redirect}");

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
            format!("-A {PRERT_CHAIN} ! -d {lo} -i lo -p tcp -j ACCEPT"),
            format!(
                "-A {PRERT_CHAIN} -p tcp -m tcp --dport {} -m mark ! --mark {ztunnel} {}",
                cfg.inbound_hbone_port,
                tproxy(cfg.inbound_hbone_port)
            ),
            format!("-A {PRERT_CHAIN} -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            format!(
                "-A {PRERT_CHAIN} ! -d {lo} -p tcp -m mark ! --mark {ztunnel} {}",
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
            format!("-A {OUTPUT_CHAIN} ! -d {lo} -o lo -j ACCEPT"),
            format!(
                "-A {OUTPUT_CHAIN} ! -d {lo} -p tcp -m mark ! --mark {ztunnel} \
                 -j REDIRECT --to-ports {}",
                cfg.outbound_port
            ),
        ],
    };
    Ruleset {
        family,
        tables: vec![mangle, nat],
        owns_istio_chains: true,
    }
}

/// Host netns chain for kubelet probes.
pub const POSTRT_CHAIN: &str = "ISTIO_POSTRT";

/// The host-side rule for kubelet probes: locally originated TCP to an enrolled pod's IP
/// (a member of `set`) is SNATed to the probe address, which the pod's rules let
/// straight through to the app instead of capturing it.
pub fn render_host_probe(cfg: &RuleConfig, family: Family, set: &str) -> Ruleset {
    Ruleset {
        family,
        tables: vec![TableRules {
            table: "nat",
            chains: vec![POSTRT_CHAIN],
            jumps: vec![format!("-A POSTROUTING -j {POSTRT_CHAIN}")],
            rules: vec![format!(
                "-A {POSTRT_CHAIN} -p tcp -m owner --socket-exists -m set --match-set {set} dst \
                 -j SNAT --to-source {}",
                cfg.probe(family)
            )],
        }],
        owns_istio_chains: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::save::parse_save;

    const SPEC: &str = include_str!("../../testdata/spec-iptables-save.txt");
    const SPEC6: &str = include_str!("../../testdata/ip6tables-save.txt");

    #[test]
    fn default_ruleset_is_exactly_the_specifications() {
        for (text, family) in [(SPEC, Family::V4), (SPEC6, Family::V6)] {
            same_as_saved(text, &render(&RuleConfig::default(), family));
        }
    }

    /// `ours` is exactly the rules and chains of the `iptables-save` dump `text`.
    fn same_as_saved(text: &str, ours: &Ruleset) {
        let spec = parse_save(text).unwrap();
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
        let nat = &render(&cfg, Family::V4).tables[1];
        assert!(nat.rules[3].ends_with("! --mark 0x123/0xfff -j REDIRECT --to-ports 25001"));
    }

    #[test]
    fn families_of_addresses() {
        assert_eq!(Family::of("10.0.0.1".parse().unwrap()), Family::V4);
        assert_eq!(Family::of("::ffff:10.0.0.1".parse().unwrap()), Family::V4);
        assert_eq!(Family::of("fd00::1".parse().unwrap()), Family::V6);
        let probe = render_host_probe(&RuleConfig::default(), Family::V6, "s-v6");
        assert!(probe.tables[0].rules[0]
            .ends_with("--to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff"));
    }
}
