//! What the control plane has sent: every resource by name, with its version and the
//! object it stands for. A response is applied resource by resource: the valid ones
//! become changes to the mesh state, the invalid ones are named (for the NACK) and
//! their last good state is kept; removals remove.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use super::translate;
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::proto::istio::security::Authorization as XdsAuthorization;
use crate::proto::istio::workload::address::Type as AddressType;
use crate::proto::istio::workload::Address as XdsAddress;
use crate::state::policy::PolicyKey;
use crate::state::sources::Change;
use crate::state::workload::{NamespacedHostname, Uid};
use crate::state::WorkloadEntry;

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// The types ztunnel subscribes to, in the order it asks for them.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// What a resource name stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Workload(Uid),
    Service(NamespacedHostname),
    Policy(PolicyKey),
}

impl Key {
    fn removal(self) -> Change {
        match self {
            Key::Workload(k) => Change::Workload(k, None),
            Key::Service(k) => Change::Service(k, None),
            Key::Policy(k) => Change::Policy(k, None),
        }
    }
}

/// A resource that could not be applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// What one response changed.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub updated: usize,
    pub removed: usize,
    pub rejected: Vec<Rejected>,
    /// The changes to the mesh state.
    pub changes: Vec<Change>,
}

impl Applied {
    /// The NACK's message: `"<resource>: <reason>"`, joined by `"; "`.
    pub fn error_message(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        Some(
            self.rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// What istiod has sent, by resource name: its version and what it stands for (the
/// objects themselves live in the mesh state).
/// Resource name → (version, what it stands for), for one type.
type Held = HashMap<Arc<str>, (Arc<str>, Key), foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct Resources {
    held: [Held; 2],
    shared: translate::Interner,
}

fn slot(type_url: &str) -> Option<usize> {
    match type_url {
        ADDRESS_TYPE => Some(0),
        AUTHORIZATION_TYPE => Some(1),
        _ => None,
    }
}

/// A resource ztunnel refuses: why, and what takes its place (for an authorization
/// policy, so that refusing it does not widen access).
struct Refused {
    reason: String,
    stand_in: Option<Change>,
}

impl From<String> for Refused {
    fn from(reason: String) -> Refused {
        Refused {
            reason,
            stand_in: None,
        }
    }
}

impl From<&str> for Refused {
    fn from(reason: &str) -> Refused {
        Refused::from(reason.to_string())
    }
}

fn decode(
    type_url: &str,
    r: &Resource,
    shared: &mut translate::Interner,
) -> Result<Change, Refused> {
    let any = r.resource.as_ref().ok_or("no resource in it")?;
    if any.type_url != type_url {
        return Err(format!("a {} in a {type_url} response", any.type_url).into());
    }
    let value = any.value.as_slice();
    if type_url == AUTHORIZATION_TYPE {
        let a = XdsAuthorization::decode(value).map_err(|e| format!("undecodable: {e}"))?;
        return match translate::policy(&a) {
            Ok(p) => {
                let p = Arc::new(p);
                Ok(Change::Policy(p.key(), Some(p)))
            }
            Err(reason) => {
                let p = Arc::new(translate::stand_in(&a));
                let what = match p.action {
                    crate::state::policy::Action::Allow => "an ALLOW that matches nothing",
                    crate::state::policy::Action::Deny => "a DENY of every connection",
                };
                Err(Refused {
                    reason: format!(
                        "{reason}; refused, so {what} stands in for it in its scope (refusing a policy never widens access)"
                    ),
                    stand_in: Some(Change::Policy(p.key(), Some(p))),
                })
            }
        };
    }
    let address = XdsAddress::decode(value).map_err(|e| format!("undecodable: {e}"))?;
    match address.r#type {
        Some(AddressType::Workload(w)) => {
            let (w, eps) = translate::workload(w, shared).map_err(Refused::from)?;
            Ok(Change::Workload(
                w.uid.clone(),
                Some(WorkloadEntry::new(w, eps)),
            ))
        }
        Some(AddressType::Service(s)) => {
            let s = Arc::new(translate::service(&s).map_err(Refused::from)?);
            Ok(Change::Service(s.key(), Some(s)))
        }
        None => Err(Refused::from(
            "an Address that is neither a workload nor a service",
        )),
    }
}

/// From this many resources on, a response is decoded on several threads.
const PARALLEL_FROM: usize = 2048;
const MAX_DECODE_THREADS: usize = 8;

/// Decodes every resource, in order. A large response (a full push of a big mesh) is
/// split over the machine's cores, each part with its own copy of the interner; the
/// strings they add are merged back.
fn decode_all(
    type_url: &str,
    resources: &[Resource],
    shared: &mut translate::Interner,
) -> Vec<Result<Change, Refused>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_DECODE_THREADS);
    if threads < 2 || resources.len() < PARALLEL_FROM {
        return resources
            .iter()
            .map(|r| decode(type_url, r, shared))
            .collect();
    }
    let chunk = resources.len().div_ceil(threads);
    let mut parts = resources.chunks(chunk);
    let first = parts.next().unwrap_or_default();
    let (mut out, interners) = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .map(|part| {
                let mut interner = shared.clone();
                scope.spawn(move || {
                    let out: Vec<_> = part
                        .iter()
                        .map(|r| decode(type_url, r, &mut interner))
                        .collect();
                    (out, interner)
                })
            })
            .collect();
        let mut out: Vec<_> = first.iter().map(|r| decode(type_url, r, shared)).collect();
        out.reserve(resources.len() - first.len());
        let mut interners = Vec::new();
        for handle in handles {
            // Decoding does not panic (property-tested); if it did, it does so here
            // as it would have on this thread.
            let (part, interner) = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            out.extend(part);
            interners.push(interner);
        }
        (out, interners)
    });
    for interner in interners {
        shared.absorb(interner);
    }
    out.shrink_to_fit();
    out
}

fn key_of(change: &Change) -> Key {
    match change {
        Change::Workload(k, _) => Key::Workload(k.clone()),
        Change::Service(k, _) => Key::Service(k.clone()),
        Change::Policy(k, _) => Key::Policy(k.clone()),
    }
}

impl Resources {
    /// Applies one response of `type_url`: the valid resources become changes, the
    /// invalid ones are named (and keep their last good state), removals remove.
    pub fn apply(&mut self, type_url: &str, resources: &[Resource], removed: &[String]) -> Applied {
        let mut applied = Applied::default();
        let Some(i) = slot(type_url) else {
            applied.rejected.push(Rejected {
                name: type_url.to_string(),
                reason: "a type ztunnel did not subscribe to".into(),
            });
            return applied;
        };
        let decoded = decode_all(type_url, resources, &mut self.shared);
        let held = &mut self.held[i];
        for (r, result) in resources.iter().zip(decoded) {
            let change = match result {
                Ok(change) => Some(change),
                Err(refused) => {
                    applied.rejected.push(Rejected {
                        name: r.name.clone(),
                        reason: refused.reason,
                    });
                    refused.stand_in
                }
            };
            let Some(change) = change else {
                continue;
            };
            let key = key_of(&change);
            let name: Arc<str> = match &key {
                // The name is the uid, usually: share the string.
                Key::Workload(uid) if *uid.0 == *r.name => uid.0.clone(),
                _ => r.name.as_str().into(),
            };
            if let Some((_, old)) = held.insert(name, (r.version.as_str().into(), key.clone())) {
                if old != key {
                    applied.changes.push(old.removal());
                }
            }
            applied.changes.push(change);
            applied.updated += 1;
        }
        for name in removed {
            if let Some((_, key)) = held.remove(name.as_str()) {
                applied.changes.push(key.removal());
                applied.removed += 1;
            }
        }
        applied
    }

    /// The versions held of `type_url`'s resources (a new stream's
    /// `initial_resource_versions`).
    pub fn versions(&self, type_url: &str) -> std::collections::BTreeMap<String, String> {
        slot(type_url)
            .map(|i| {
                self.held[i]
                    .iter()
                    .map(|(k, (v, _))| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.held.iter().map(|h| h.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::istio::workload as xwl;

    fn any<M: Message>(type_url: &str, m: &M) -> prost_types::Any {
        prost_types::Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn workload(name: &str, ip: [u8; 4]) -> Resource {
        let w = xwl::Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![ip.to_vec()],
            ..Default::default()
        };
        Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(any(
                ADDRESS_TYPE,
                &XdsAddress {
                    r#type: Some(AddressType::Workload(w)),
                },
            )),
            ..Default::default()
        }
    }

    fn authorization(a: crate::proto::istio::security::Authorization) -> Resource {
        Resource {
            name: format!("{}/{}", a.namespace, a.name),
            version: "v1".into(),
            resource: Some(any(AUTHORIZATION_TYPE, &a)),
            ..Default::default()
        }
    }

    /// A policy ztunnel cannot read is refused (NACKed, named) without widening
    /// access: a refused ALLOW leaves its scope denying, a refused DENY denies all.
    #[test]
    fn a_refused_policy_is_replaced_by_one_that_never_widens_access() {
        use crate::proto::istio::security as xsec;
        use crate::state::policy::{Action, Scope};
        let unreadable = |action: xsec::Action| xsec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: xsec::Scope::Namespace as i32,
            action: action as i32,
            rules: vec![xsec::Rule {
                clauses: vec![xsec::Clause {
                    matches: vec![xsec::Match {
                        source_ips: vec![xsec::Address {
                            address: vec![1, 2, 3],
                            length: 8,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        for (action, what, rules) in [
            (xsec::Action::Allow, "an ALLOW that matches nothing", 0),
            (xsec::Action::Deny, "a DENY of every connection", 1),
        ] {
            let mut r = Resources::default();
            let applied = r.apply(
                AUTHORIZATION_TYPE,
                &[authorization(unreadable(action))],
                &[],
            );
            let msg = applied.error_message().unwrap();
            assert!(msg.starts_with("ns/p: ") && msg.contains(what), "{msg}");
            let [Change::Policy(key, Some(p))] = &applied.changes[..] else {
                panic!("no stand-in: {:?}", applied.changes.len());
            };
            assert_eq!(key.to_string(), "ns/p");
            assert_eq!((p.scope, p.rules.len()), (Scope::Namespace, rules));
            assert_eq!(p.action == Action::Allow, action == xsec::Action::Allow);
            // Held like any policy: its removal removes the stand-in.
            let applied = r.apply(AUTHORIZATION_TYPE, &[], &["ns/p".into()]);
            assert!(matches!(&applied.changes[..], [Change::Policy(_, None)]));
        }
    }

    #[test]
    fn a_bad_resource_is_named_the_rest_applies_and_its_last_good_state_stays() {
        let mut r = Resources::default();
        let applied = r.apply(ADDRESS_TYPE, &[workload("a", [10, 0, 0, 1])], &[]);
        assert_eq!(applied.error_message(), None);
        let mut bad = workload("a", [10, 0, 0, 1]);
        bad.resource = Some(prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: vec![0xff, 0xff],
        });
        let applied = r.apply(ADDRESS_TYPE, &[bad, workload("b", [10, 0, 0, 2])], &[]);
        assert_eq!(applied.updated, 1);
        let msg = applied.error_message().unwrap();
        assert!(msg.starts_with("a: undecodable"), "{msg}");
        assert!(
            matches!(&applied.changes[..], [Change::Workload(uid, Some(_))] if &*uid.0 == "b"),
            "only b changes: a keeps its last good state"
        );
        assert_eq!(r.versions(ADDRESS_TYPE).len(), 2);
        let applied = r.apply(ADDRESS_TYPE, &[], &["a".into(), "unknown".into()]);
        assert_eq!(applied.removed, 1);
        assert!(matches!(&applied.changes[..], [Change::Workload(uid, None)] if &*uid.0 == "a"));
    }

    #[test]
    fn a_large_response_decoded_in_parts_keeps_order_and_names_its_bad_resources() {
        let n = PARALLEL_FROM * 2 + 7;
        let resources: Vec<Resource> = (0..n)
            .map(|i| {
                let mut r = workload(&format!("w{i}"), (i as u32 + 1).to_be_bytes());
                if i % 1000 == 999 {
                    r.resource = Some(prost_types::Any {
                        type_url: ADDRESS_TYPE.into(),
                        value: vec![0xff],
                    });
                }
                r
            })
            .collect();
        let mut r = Resources::default();
        let applied = r.apply(ADDRESS_TYPE, &resources, &[]);
        let bad: Vec<String> = (0..n)
            .filter(|i| i % 1000 == 999)
            .map(|i| format!("w{i}"))
            .collect();
        let rejected: Vec<&str> = applied.rejected.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(rejected, bad);
        assert_eq!(applied.updated, n - bad.len());
        let uids: Vec<String> = applied
            .changes
            .iter()
            .map(|c| match c {
                Change::Workload(uid, Some(_)) => uid.0.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        let want: Vec<String> = (0..n)
            .filter(|i| i % 1000 != 999)
            .map(|i| format!("w{i}"))
            .collect();
        assert_eq!(uids, want);
    }
}
