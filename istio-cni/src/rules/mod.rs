//! In-pod redirection: the iptables ruleset and the policy route of each address family,
//! applied atomically (per family) and idempotently inside a pod's netns, checked for
//! drift, and removed without a trace. A netns holding an address of a family that is
//! not redirected is refused: its traffic of that family would bypass ztunnel.

pub mod conntrack;
pub mod hostprobe;
pub mod iptables;
pub mod render;
pub mod route;
pub mod save;

use protocol::Netns;

pub use iptables::{Backend, Iptables, IptablesError};
pub use render::{render, Family, RuleConfig, Ruleset};
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
    #[error("reading the pod's addresses: {0}")]
    Addresses(#[source] std::io::Error),
    #[error("the pod has the {family} address {addr}, and {family} redirection is off on this node: its {family} traffic would bypass ztunnel (turn on AMBIENT_IPV6, or give the pod no {family} address)")]
    FamilyNotRedirected {
        family: Family,
        addr: std::net::IpAddr,
    },
}

/// One family's part of a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyVerification {
    pub family: Family,
    pub iptables: Drift,
    pub route: RouteState,
    /// The policy rule and route expected (`ip rule` / `ip route` arguments).
    pub expected_rule: String,
    pub expected_route: String,
}

/// The result of checking a netns against the expected redirection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub families: Vec<FamilyVerification>,
}

impl Verification {
    pub fn is_clean(&self) -> bool {
        self.families
            .iter()
            .all(|f| f.iptables.is_clean() && f.route.rule && f.route.route)
    }

    /// The differences, one per line (`IPv4 missing: nat: -A …`, `IPv6 policy route
    /// missing: …`); empty when clean.
    pub fn differences(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.families {
            let family = f.family;
            out.extend(
                f.iptables
                    .missing
                    .iter()
                    .map(|r| format!("{family} missing: {r}")),
            );
            out.extend(
                f.iptables
                    .extra
                    .iter()
                    .map(|r| format!("{family} extra: {r}")),
            );
            if !f.route.rule {
                out.push(format!("{family} missing: ip rule {}", f.expected_rule));
            }
            if !f.route.route {
                out.push(format!("{family} missing: ip route {}", f.expected_route));
            }
        }
        out
    }
}

/// One family's ruleset and policy route.
#[derive(Clone, Debug)]
struct FamilyRules {
    ruleset: Ruleset,
    route: PolicyRoute,
}

/// Installs, checks and removes the redirection in pod network namespaces, for each
/// enabled address family.
#[derive(Clone, Debug)]
pub struct Redirection {
    cfg: RuleConfig,
    families: Vec<FamilyRules>,
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
    /// Redirection of `families` (IPv4 always; IPv6 unless turned off).
    pub fn new(cfg: RuleConfig, iptables: Iptables, families: &[Family]) -> Self {
        let mut families: Vec<Family> = families.to_vec();
        families.sort();
        families.dedup();
        Redirection {
            families: families
                .into_iter()
                .map(|f| FamilyRules {
                    ruleset: render(&cfg, f),
                    route: PolicyRoute::new(&cfg, f),
                })
                .collect(),
            cfg,
            iptables,
        }
    }

    /// The families redirected.
    pub fn families(&self) -> Vec<Family> {
        self.families.iter().map(|f| f.ruleset.family).collect()
    }

    /// Runs `f` for every family at once, one thread each: a family's work is a few
    /// tool processes run one after the other (save, route state, restore, route),
    /// and the families touch separate tables and routes, so IPv4 and IPv6 need not
    /// wait for each other. Results in family order; the first error wins.
    fn per_family<T: Send>(
        &self,
        f: impl Fn(&FamilyRules) -> Result<T, RulesError> + Sync,
    ) -> Result<Vec<T>, RulesError> {
        match self.families.as_slice() {
            [one] => Ok(vec![f(one)?]),
            all => std::thread::scope(|s| {
                let running: Vec<_> = all.iter().map(|fam| s.spawn(|| f(fam))).collect();
                running
                    .into_iter()
                    .map(|t| {
                        t.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            }),
        }
    }

    pub fn verify(&self, netns: &Netns) -> Result<Verification, RulesError> {
        let families = self.per_family(|f| {
            let family = f.ruleset.family;
            let saved = self.iptables.save(netns, family)?;
            Ok(FamilyVerification {
                family,
                iptables: save::drift(&f.ruleset, &saved),
                route: f.route.state(netns).map_err(RulesError::Route)?,
                expected_rule: f.route.rule(),
                expected_route: f.route.route(),
            })
        })?;
        Ok(Verification { families })
    }

    /// Refuses a netns holding an address (beyond loopback and link-local) of a family
    /// that is not redirected: enrolling it would leave that family's traffic
    /// uncaptured while the pod counts as in the mesh.
    pub fn check_families(&self, netns: &Netns) -> Result<(), RulesError> {
        let redirected = self.families();
        let addrs = netns.addresses().map_err(RulesError::Addresses)?;
        match addrs
            .into_iter()
            .filter(protocol::routable)
            .find(|a| !redirected.contains(&Family::of(*a)))
        {
            Some(addr) => Err(RulesError::FamilyNotRedirected {
                family: Family::of(addr),
                addr,
            }),
            None => Ok(()),
        }
    }

    /// Brings the netns to exactly the expected redirection, family by family, writing
    /// only what drifted (see [`write_tables`] for what a failed write leaves). A netns
    /// with an address of a family not redirected is refused before anything is
    /// written.
    pub fn apply(&self, netns: &Netns) -> Result<Applied, RulesError> {
        self.check_families(netns)?;
        let applied = self.per_family(|f| {
            let saved = self.iptables.save(netns, f.ruleset.family)?;
            let drift = save::drift(&f.ruleset, &saved);
            let route = f.route.state(netns).map_err(RulesError::Route)?;
            if drift.is_clean() && route.rule && route.route {
                return Ok(Applied::Unchanged);
            }
            if !drift.is_clean() {
                write_tables(&self.iptables, &f.ruleset, netns, &saved)?;
            }
            f.route.apply(netns, route).map_err(RulesError::Route)?;
            Ok(Applied::Changed)
        })?;
        Ok(if applied.contains(&Applied::Changed) {
            Applied::Changed
        } else {
            Applied::Unchanged
        })
    }

    /// Removes our chains, jumps, rules and routes of every family, then flushes
    /// redirected conntrack entries. Everything else in the netns is left as it was.
    pub fn remove(&self, netns: &Netns) -> Result<(), RulesError> {
        for f in &self.families {
            let family = f.ruleset.family;
            let saved = self.iptables.save(netns, family)?;
            let input = iptables::remove_input(&f.ruleset, &saved);
            if !input.is_empty() {
                self.iptables.restore(netns, family, &input)?;
            }
            let route = f.route.state(netns).map_err(RulesError::Route)?;
            f.route.remove(netns, route).map_err(RulesError::Route)?;
            conntrack::flush_redirected(netns, &self.cfg, family).map_err(RulesError::Conntrack)?;
        }
        Ok(())
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
    if let Err(e) = iptables.restore(netns, want.family, &input) {
        if fresh {
            if let Ok(now) = iptables.save(netns, want.family) {
                let undo = iptables::remove_input(want, &now);
                if !undo.is_empty() {
                    let _ = iptables.restore(netns, want.family, &undo);
                }
            }
        }
        return Err(e.into());
    }
    Ok(())
}
