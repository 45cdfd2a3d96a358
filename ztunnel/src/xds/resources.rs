//! What the control plane has sent: every resource by name, with its version, already
//! translated. A response is applied resource by resource: the valid ones replace or
//! add, the invalid ones are named (for the NACK) and their last good state is kept;
//! removals remove.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use super::translate::{self, Endpoints};
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::proto::istio::security::Authorization as XdsAuthorization;
use crate::proto::istio::workload::address::Type as AddressType;
use crate::proto::istio::workload::Address as XdsAddress;
use crate::state::policy::Policy;
use crate::state::service::Service;
use crate::state::workload::Workload;
use crate::state::Objects;

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// The types ztunnel subscribes to, in the order it asks for them.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

#[derive(Clone, Debug)]
enum Address {
    Workload(Arc<Workload>, Endpoints),
    Service(Arc<Service>),
}

#[derive(Clone, Debug)]
struct Held<T> {
    version: String,
    value: T,
}

/// A resource that could not be applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// What one response changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub updated: usize,
    pub removed: usize,
    pub rejected: Vec<Rejected>,
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

#[derive(Debug, Default)]
pub struct Resources {
    addresses: HashMap<String, Held<Address>>,
    policies: HashMap<String, Held<Arc<Policy>>>,
}

fn decode_address(r: &Resource) -> Result<Address, String> {
    let any = r.resource.as_ref().ok_or("no resource in it")?;
    if any.type_url != ADDRESS_TYPE {
        return Err(format!("a {} where an Address was expected", any.type_url));
    }
    let address =
        XdsAddress::decode(any.value.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
    match address.r#type {
        Some(AddressType::Workload(w)) => {
            let (w, eps) = translate::workload(&w)?;
            Ok(Address::Workload(Arc::new(w), eps))
        }
        Some(AddressType::Service(s)) => Ok(Address::Service(Arc::new(translate::service(&s)?))),
        None => Err("an Address that is neither a workload nor a service".into()),
    }
}

fn decode_policy(r: &Resource) -> Result<Arc<Policy>, String> {
    let any = r.resource.as_ref().ok_or("no resource in it")?;
    if any.type_url != AUTHORIZATION_TYPE {
        return Err(format!(
            "a {} where an Authorization was expected",
            any.type_url
        ));
    }
    let a =
        XdsAuthorization::decode(any.value.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
    Ok(Arc::new(translate::policy(&a)?))
}

fn apply_to<T>(
    held: &mut HashMap<String, Held<T>>,
    resources: &[Resource],
    removed: &[String],
    decode: impl Fn(&Resource) -> Result<T, String>,
) -> Applied {
    let mut applied = Applied::default();
    for r in resources {
        match decode(r) {
            Ok(value) => {
                held.insert(
                    r.name.clone(),
                    Held {
                        version: r.version.clone(),
                        value,
                    },
                );
                applied.updated += 1;
            }
            Err(reason) => applied.rejected.push(Rejected {
                name: r.name.clone(),
                reason,
            }),
        }
    }
    for name in removed {
        if held.remove(name).is_some() {
            applied.removed += 1;
        }
    }
    applied
}

impl Resources {
    /// Applies one response of `type_url`.
    pub fn apply(&mut self, type_url: &str, resources: &[Resource], removed: &[String]) -> Applied {
        match type_url {
            ADDRESS_TYPE => apply_to(&mut self.addresses, resources, removed, decode_address),
            AUTHORIZATION_TYPE => apply_to(&mut self.policies, resources, removed, decode_policy),
            other => Applied {
                rejected: vec![Rejected {
                    name: other.to_string(),
                    reason: "a type ztunnel did not subscribe to".into(),
                }],
                ..Applied::default()
            },
        }
    }

    /// The versions held of `type_url`'s resources (a new stream's
    /// `initial_resource_versions`).
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(held: &HashMap<String, Held<T>>) -> HashMap<String, String> {
            held.iter()
                .map(|(k, v)| (k.clone(), v.version.clone()))
                .collect()
        }
        match type_url {
            ADDRESS_TYPE => of(&self.addresses),
            AUTHORIZATION_TYPE => of(&self.policies),
            _ => HashMap::new(),
        }
    }

    /// Everything held, as domain objects.
    pub fn objects(&self) -> Objects {
        let mut objects = Objects::default();
        for held in self.addresses.values() {
            match &held.value {
                Address::Workload(w, eps) => {
                    objects.workloads.push(w.clone());
                    objects.endpoints.extend(eps.iter().cloned());
                }
                Address::Service(s) => objects.services.push(s.clone()),
            }
        }
        objects.policies = self.policies.values().map(|h| h.value.clone()).collect();
        objects
    }

    pub fn len(&self) -> usize {
        self.addresses.len() + self.policies.len()
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
        let names: Vec<_> = {
            let mut n: Vec<_> = r
                .objects()
                .workloads
                .iter()
                .map(|w| w.name.clone())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names, ["a", "b"], "a keeps its last good state");
        assert_eq!(r.versions(ADDRESS_TYPE).len(), 2);
        let applied = r.apply(ADDRESS_TYPE, &[], &["a".into(), "unknown".into()]);
        assert_eq!(applied.removed, 1);
        assert_eq!(r.objects().workloads.len(), 1);
    }
}
