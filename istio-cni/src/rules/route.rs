//! The policy route that returns redirected traffic to ztunnel, per family, inside the
//! pod netns: `ip -4 rule add fwmark 0x111/0xfff pref 32764 lookup 100` and
//! `ip -4 route replace local 0.0.0.0/0 dev lo table 100`, and the same with `-6` and
//! `local ::/0`.

use std::fmt::Write;

use protocol::Netns;

use super::render::{Family, RuleConfig};
use crate::exec::{self, ExecError};

/// What of the policy route is present in a netns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteState {
    pub rule: bool,
    pub route: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRoute {
    family: Family,
    mark: String,
    table: u32,
    priority: u32,
}

impl PolicyRoute {
    pub fn new(cfg: &RuleConfig, family: Family) -> Self {
        PolicyRoute {
            family,
            mark: format!("0x{:x}/0x{:x}", cfg.redirect_mark, cfg.mark_mask),
            table: cfg.route_table,
            priority: cfg.rule_priority,
        }
    }

    /// The policy rule, as `ip rule add` arguments.
    pub fn rule(&self) -> String {
        format!(
            "fwmark {} pref {} lookup {}",
            self.mark, self.priority, self.table
        )
    }

    /// The policy route, as `ip route add` arguments.
    pub fn route(&self) -> String {
        format!(
            "local {} dev lo table {}",
            self.family.everything(),
            self.table
        )
    }

    fn batch(&self, netns: &Netns, script: &str) -> Result<String, ExecError> {
        let mut cmd = exec::in_netns(netns, "ip");
        cmd.args([self.family.ip_flag(), "-batch", "-"]);
        exec::run(cmd, Some(script))
    }

    /// Reads the rule and route in one `ip` run.
    pub fn state(&self, netns: &Netns) -> Result<RouteState, ExecError> {
        let out = self.batch(
            netns,
            &format!(
                "rule show pref {}\nroute show table {}\n",
                self.priority, self.table
            ),
        )?;
        Ok(self.parse_state(&out))
    }

    fn parse_state(&self, out: &str) -> RouteState {
        let pref = format!("{}:", self.priority);
        let fwmark = format!("fwmark {}", self.mark);
        let lookup = format!("lookup {}", self.table);
        RouteState {
            rule: out.lines().any(|l| {
                l.starts_with(&pref) && l.contains(&fwmark) && l.split_once(&lookup).is_some()
            }),
            route: out.lines().any(|l| l.starts_with("local default dev lo")),
        }
    }

    /// Adds what `have` lacks.
    pub fn apply(&self, netns: &Netns, have: RouteState) -> Result<(), ExecError> {
        let mut script = String::new();
        if !have.route {
            let _ = writeln!(script, "route replace {}", self.route());
        }
        if !have.rule {
            let _ = writeln!(script, "rule add {}", self.rule());
        }
        if !script.is_empty() {
            self.batch(netns, &script)?;
        }
        Ok(())
    }

    /// Removes what `have` has.
    pub fn remove(&self, netns: &Netns, have: RouteState) -> Result<(), ExecError> {
        let mut script = String::new();
        if have.rule {
            let _ = writeln!(script, "rule del {}", self.rule());
        }
        if have.route {
            let _ = writeln!(script, "route del {}", self.route());
        }
        if !script.is_empty() {
            self.batch(netns, &script)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_read_from_ip_output() {
        let pr = PolicyRoute::new(&RuleConfig::default(), Family::V4);
        let out =
            "32764:\tfrom all fwmark 0x111/0xfff lookup 100\nlocal default dev lo scope host \n";
        assert_eq!(
            pr.parse_state(out),
            RouteState {
                rule: true,
                route: true
            }
        );
        assert_eq!(pr.parse_state(""), RouteState::default());
        // Someone else's rule at our priority is not ours.
        let other = "32764:\tfrom all fwmark 0x222/0xfff lookup 100\n";
        assert!(!pr.parse_state(other).rule);
    }
}
