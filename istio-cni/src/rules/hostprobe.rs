//! Rules in the node's (host) netns that let kubelet probes reach enrolled pods, one
//! set of them per address family.
//!
//! Probes come from the node itself. The nat chain `ISTIO_POSTRT` SNATs locally
//! originated TCP to an enrolled pod's IP to 169.254.7.127 (IPv6:
//! fd16:9254:7127:1337:ffff:ffff:ffff:ffff), and the pod's own rules accept that
//! source straight to the app instead of sending it through ztunnel. The enrolled IPs
//! live in an ipset per family (`istio-inpod-probes-v4`, `-v6`), each entry commented
//! with its pod's uid, so that a stale pod can never remove an IP that a newer pod now
//! has.

use std::collections::BTreeMap;
use std::net::IpAddr;

use protocol::{Netns, WorkloadUid};

use super::render::{render_host_probe, Family, RuleConfig, Ruleset};
use super::{save, write_tables, Applied, Iptables, RulesError};
use crate::exec;

/// Istio's sets are this prefix plus `-v4` / `-v6`.
pub const PROBE_SET_PREFIX: &str = "istio-inpod-probes";

/// The set of `family` for `prefix`: `istio-inpod-probes-v4`.
pub fn set_name(prefix: &str, family: Family) -> String {
    format!("{prefix}-{}", family.suffix())
}

pub struct HostProbes {
    family: Family,
    ruleset: Ruleset,
    set: String,
    iptables: Iptables,
}

impl HostProbes {
    /// The probe rule and set of `family`, the set named after `prefix`.
    pub fn new(cfg: &RuleConfig, iptables: Iptables, family: Family, prefix: &str) -> Self {
        let set = set_name(prefix, family);
        HostProbes {
            family,
            ruleset: render_host_probe(cfg, family, &set),
            set,
            iptables,
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    fn ipset(&self, node: &Netns, args: &[&str]) -> Result<String, RulesError> {
        let mut cmd = exec::in_netns(node, "ipset");
        cmd.args(args);
        exec::run(cmd, None).map_err(RulesError::Ipset)
    }

    /// Creates the set (if missing) and the chain (if drifted), in `node`.
    pub fn install(&self, node: &Netns) -> Result<Applied, RulesError> {
        let family = match self.family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        };
        self.ipset(
            node,
            &[
                "create", "-exist", &self.set, "hash:ip", "family", family, "comment",
            ],
        )?;
        let saved = self.iptables.save(node, self.family)?;
        if save::drift(&self.ruleset, &saved).is_clean() {
            return Ok(Applied::Unchanged);
        }
        write_tables(&self.iptables, &self.ruleset, node, &saved)?;
        Ok(Applied::Changed)
    }

    /// Removes the chain, then the set.
    pub fn uninstall(&self, node: &Netns) -> Result<(), RulesError> {
        let saved = self.iptables.save(node, self.family)?;
        let input = super::iptables::remove_input(&self.ruleset, &saved);
        if !input.is_empty() {
            self.iptables.restore(node, self.family, &input)?;
        }
        if self
            .ipset(node, &["list", "-n"])?
            .lines()
            .any(|l| l == self.set)
        {
            self.ipset(node, &["destroy", &self.set])?;
        }
        Ok(())
    }

    /// Adds (or re-keys) `ip` for pod `uid`.
    pub fn add(&self, node: &Netns, uid: &WorkloadUid, ip: IpAddr) -> Result<(), RulesError> {
        let ip = ip.to_string();
        self.ipset(
            node,
            &["add", "-exist", &self.set, &ip, "comment", uid.as_str()],
        )
        .map(drop)
    }

    /// Removes `ip` if it is still keyed to `uid`; an IP reused by another pod stays.
    pub fn remove(&self, node: &Netns, uid: &WorkloadUid, ip: IpAddr) -> Result<bool, RulesError> {
        if self.members(node)?.get(&ip).map(String::as_str) != Some(uid.as_str()) {
            return Ok(false);
        }
        self.ipset(node, &["del", "-exist", &self.set, &ip.to_string()])?;
        Ok(true)
    }

    /// The set's members: IP -> pod uid.
    pub fn members(&self, node: &Netns) -> Result<BTreeMap<IpAddr, String>, RulesError> {
        let saved = self.ipset(node, &["save", &self.set])?;
        Ok(parse_members(&saved, &self.set))
    }

    /// Converges the set to exactly `want` (after an agent restart).
    pub fn sync(
        &self,
        node: &Netns,
        want: &BTreeMap<IpAddr, WorkloadUid>,
    ) -> Result<(), RulesError> {
        let want: BTreeMap<IpAddr, WorkloadUid> = want
            .iter()
            .filter(|(ip, _)| Family::of(**ip) == self.family)
            .map(|(ip, uid)| (*ip, uid.clone()))
            .collect();
        let want = &want;
        let have = self.members(node)?;
        for (ip, uid) in want {
            if have.get(ip).map(String::as_str) != Some(uid.as_str()) {
                self.add(node, uid, *ip)?;
            }
        }
        for ip in have.keys().filter(|ip| !want.contains_key(ip)) {
            self.ipset(node, &["del", "-exist", &self.set, &ip.to_string()])?;
        }
        Ok(())
    }
}

/// Parses `ipset save` output: `add <set> <ip> comment "<uid>"` lines.
fn parse_members(saved: &str, set: &str) -> BTreeMap<IpAddr, String> {
    saved
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("add ")?.strip_prefix(set)?.trim_start();
            let (ip, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let uid = tail
                .trim()
                .strip_prefix("comment ")
                .map(|c| c.trim_matches('"').to_string())
                .unwrap_or_default();
            Some((ip.parse().ok()?, uid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_read_with_their_uids() {
        let saved = "create istio-inpod-probes-v4 hash:ip family inet hashsize 1024 maxelem 65536 comment\n\
                     add istio-inpod-probes-v4 10.0.0.1 comment \"uid-a\"\n\
                     add istio-inpod-probes-v4 10.0.0.2\n\
                     add other 10.0.0.3 comment \"x\"\n";
        let m = parse_members(saved, "istio-inpod-probes-v4");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&"10.0.0.1".parse::<IpAddr>().unwrap()], "uid-a");
        assert_eq!(m[&"10.0.0.2".parse::<IpAddr>().unwrap()], "");
    }

    proptest::proptest! {
        #[test]
        fn prop_ipset_save_output_never_panics(text in ".{0,300}", ip in "[0-9a-f.:]{0,20}") {
            let _ = parse_members(&text, "s-v4");
            let _ = parse_members(&format!("add s-v4 {ip} comment \"{text}\"\n"), "s-v4");
        }
    }

    #[test]
    fn the_host_rule_is_in_iptables_save_form() {
        let r = render_host_probe(&RuleConfig::default(), Family::V4, "istio-inpod-probes-v4");
        assert_eq!(
            r.tables[0].rules[0],
            "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127"
        );
    }
}
