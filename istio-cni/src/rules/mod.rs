//! In-pod redirection: the iptables ruleset and the policy route, applied atomically and
//! idempotently inside a pod's netns, checked for drift, and removed without a trace.

pub mod conntrack;
pub mod hostprobe;
pub mod iptables;
pub mod render;
pub mod route;
pub mod save;

use protocol::Netns;

pub use iptables::{Backend, Iptables, IptablesError};
pub use render::{render, RuleConfig, Ruleset};
pub use route::{PolicyRoute, RouteState};
pub use save::Drift;

use crate::exec::ExecError;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("iptables in the pod netns: {0}")]
    Iptables(#[from] IptablesError),
    #[error("policy route in the pod netns: {0}")]
    Route(#[source] ExecError),
    #[error("conntrack flush in the pod netns: {0}")]
    Conntrack(#[source] ExecError),
    #[error("ipset: {0}")]
    Ipset(#[source] ExecError),
}

/// The result of checking a netns against the expected redirection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub iptables: Drift,
    pub route: RouteState,
}

impl Verification {
    pub fn is_clean(&self) -> bool {
        self.iptables.is_clean() && self.route.rule && self.route.route
    }
}

/// Installs, checks and removes the redirection in pod network namespaces.
#[derive(Clone, Debug)]
pub struct Redirection {
    cfg: RuleConfig,
    ruleset: Ruleset,
    route: PolicyRoute,
    iptables: Iptables,
}

/// What [`Redirection::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Everything was already in place; nothing was written.
    Unchanged,
    /// Rules were installed or repaired.
    Changed,
}

impl Redirection {
    pub fn new(cfg: RuleConfig, iptables: Iptables) -> Self {
        Redirection {
            ruleset: render(&cfg),
            route: PolicyRoute::new(&cfg),
            cfg,
            iptables,
        }
    }

    pub fn verify(&self, netns: &Netns) -> Result<Verification, RulesError> {
        let saved = self.iptables.save(netns)?;
        Ok(Verification {
            iptables: save::drift(&self.ruleset, &saved),
            route: self.route.state(netns).map_err(RulesError::Route)?,
        })
    }

    /// Brings the netns to exactly the expected redirection, writing only if it drifted
    /// (see [`write_tables`] for what a failed write leaves).
    pub fn apply(&self, netns: &Netns) -> Result<Applied, RulesError> {
        let saved = self.iptables.save(netns)?;
        let drift = save::drift(&self.ruleset, &saved);
        let route = self.route.state(netns).map_err(RulesError::Route)?;
        if drift.is_clean() && route.rule && route.route {
            return Ok(Applied::Unchanged);
        }
        if !drift.is_clean() {
            write_tables(&self.iptables, &self.ruleset, netns, &saved)?;
        }
        self.route.apply(netns, route).map_err(RulesError::Route)?;
        Ok(Applied::Changed)
    }

    /// Removes our chains, jumps, rule and route, then flushes redirected conntrack
    /// entries. Everything else in the netns is left as it was.
    pub fn remove(&self, netns: &Netns) -> Result<(), RulesError> {
        let saved = self.iptables.save(netns)?;
        let input = iptables::remove_input(&self.ruleset, &saved);
        if !input.is_empty() {
            self.iptables.restore(netns, &input)?;
        }
        let route = self.route.state(netns).map_err(RulesError::Route)?;
        self.route.remove(netns, route).map_err(RulesError::Route)?;
        conntrack::flush_redirected(netns, &self.cfg).map_err(RulesError::Conntrack)
    }
}

/// Writes `want` over what `saved` shows, in one `iptables-restore`.
///
/// iptables commits table by table; if the restore fails on a netns that had none of
/// our chains, what was committed is removed again (all or nothing). On a netns that
/// already had them the rules are left as they are: in a pod, half the rules still
/// fail closed, none would fail open.
pub(crate) fn write_tables(
    iptables: &Iptables,
    want: &Ruleset,
    netns: &Netns,
    saved: &[save::SavedTable],
) -> Result<(), RulesError> {
    let fresh = saved.iter().all(|t| {
        want.tables
            .iter()
            .filter(|w| w.table == t.name)
            .all(|w| w.chains.iter().all(|c| !t.has_chain(c)))
    });
    let input = iptables::apply_input(want, saved);
    if let Err(e) = iptables.restore(netns, &input) {
        if fresh {
            if let Ok(now) = iptables.save(netns) {
                let undo = iptables::remove_input(want, &now);
                if !undo.is_empty() {
                    let _ = iptables.restore(netns, &undo);
                }
            }
        }
        return Err(e.into());
    }
    Ok(())
}
