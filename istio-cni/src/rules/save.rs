//! Parsing `iptables-save` output and comparing it with what we expect (drift).

use std::fmt;

use super::render::Ruleset;

/// A chain declaration line: `:NAME POLICY [packets:bytes]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedChain {
    pub name: String,
    /// `ACCEPT`/`DROP` for built-in chains, `-` for user-defined ones.
    pub policy: String,
}

/// One table of an `iptables-save` dump; counters and comments are dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<SavedChain>,
    /// `-A CHAIN …` lines in order.
    pub rules: Vec<String>,
}

impl SavedTable {
    pub fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| c.name == name)
    }

    /// The rules of `chain`, in order.
    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .map(String::as_str)
            .filter(move |r| rule_chain(r) == Some(chain))
    }
}

/// The chain an `-A CHAIN …` line appends to.
pub fn rule_chain(rule: &str) -> Option<&str> {
    let mut words = rule.split_ascii_whitespace();
    (words.next() == Some("-A")).then(|| words.next()).flatten()
}

#[derive(Debug, thiserror::Error)]
#[error("iptables-save output line {line}: {reason}")]
pub struct SaveParseError {
    pub line: usize,
    pub reason: &'static str,
}

/// Parses an `iptables-save` dump.
pub fn parse_save(text: &str) -> Result<Vec<SavedTable>, SaveParseError> {
    let mut tables = Vec::new();
    let mut current: Option<SavedTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |reason| SaveParseError {
            line: i + 1,
            reason,
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if current.is_some() {
                return Err(err("table starts before the previous one's COMMIT"));
            }
            current = Some(SavedTable {
                name: name.to_string(),
                ..SavedTable::default()
            });
            continue;
        }
        let table = current
            .as_mut()
            .ok_or_else(|| err("line outside a table"))?;
        if line == "COMMIT" {
            tables.extend(current.take());
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_ascii_whitespace();
            let name = words
                .next()
                .ok_or_else(|| err("chain line without a name"))?;
            let policy = words
                .next()
                .ok_or_else(|| err("chain line without a policy"))?;
            table.chains.push(SavedChain {
                name: name.to_string(),
                policy: policy.to_string(),
            });
        } else if let Some(rest) = line.strip_prefix("[") {
            // Rule with counters (`iptables-save -c`): `[p:b] -A …`.
            let rule = rest.split_once("] ").ok_or_else(|| err("bad counters"))?.1;
            table.rules.push(rule.to_string());
        } else if line.starts_with("-A ") {
            table.rules.push(line.to_string());
        } else {
            return Err(err("unrecognised line"));
        }
    }
    if current.is_some() {
        return Err(SaveParseError {
            line: text.lines().count(),
            reason: "table without COMMIT",
        });
    }
    Ok(tables)
}

/// A chain named `ISTIO_*` in a pod's netns that the expected ruleset does not have
/// in that table: left by another agent (Istio's own releases add chains of their
/// own, such as a nat `ISTIO_PRERT`), and, with the rules jumping to it, ours to take
/// out, since every `ISTIO_*` chain in a pod is the redirection's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignChain {
    pub table: String,
    pub chain: String,
    /// Rules outside foreign chains that jump (`-j`/`-g`) to this one.
    pub jumps: Vec<String>,
}

/// The foreign `ISTIO_*` chains of `saved`, in every table (none where the ruleset
/// does not own them all: the node's netns).
pub fn foreign_chains(expected: &Ruleset, saved: &[SavedTable]) -> Vec<ForeignChain> {
    let mut out = Vec::new();
    if !expected.owns_istio_chains {
        return out;
    }
    for have in saved {
        let ours: &[&str] = expected
            .tables
            .iter()
            .find(|t| t.table == have.name)
            .map_or(&[], |t| &t.chains);
        let foreign: Vec<&str> = have
            .chains
            .iter()
            .map(|c| c.name.as_str())
            .filter(|c| c.starts_with("ISTIO_") && !ours.contains(c))
            .collect();
        for chain in &foreign {
            let jumps = have
                .rules
                .iter()
                .filter(|r| rule_chain(r).is_some_and(|c| !foreign.contains(&c)))
                .filter(|r| {
                    let words: Vec<&str> = r.split_ascii_whitespace().collect();
                    words
                        .windows(2)
                        .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == *chain)
                })
                .cloned()
                .collect();
            out.push(ForeignChain {
                table: have.name.clone(),
                chain: chain.to_string(),
                jumps,
            });
        }
    }
    out
}

/// How the live rules differ from the expected ones. Rules that are not ours (other
/// chains, other rules in built-in chains) are never reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// `table: rule` lines that should be there and are not.
    pub missing: Vec<String>,
    /// `table: rule` lines in our chains (or duplicated jumps) that should not be.
    pub extra: Vec<String>,
}

impl Drift {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return f.write_str("no drift");
        }
        for m in &self.missing {
            writeln!(f, "missing: {m}")?;
        }
        for e in &self.extra {
            writeln!(f, "extra:   {e}")?;
        }
        Ok(())
    }
}

/// Compares a parsed dump with the expected ruleset.
pub fn drift(expected: &Ruleset, saved: &[SavedTable]) -> Drift {
    let mut out = Drift::default();
    let empty = SavedTable::default();
    for want in &expected.tables {
        let t = want.table;
        let have = saved.iter().find(|s| s.name == t).unwrap_or(&empty);
        for chain in &want.chains {
            if !have.has_chain(chain) {
                out.missing.push(format!("{t}: :{chain} - [0:0]"));
            }
        }
        for jump in &want.jumps {
            let count = have.rules.iter().filter(|r| *r == jump).count();
            match count {
                0 => out.missing.push(format!("{t}: {jump}")),
                1 => {}
                n => out
                    .extra
                    .extend(std::iter::repeat_n(format!("{t}: {jump}"), n - 1)),
            }
        }
        for chain in &want.chains {
            let want_rules: Vec<&str> = want
                .rules
                .iter()
                .map(String::as_str)
                .filter(|r| rule_chain(r) == Some(chain))
                .collect();
            let have_rules: Vec<&str> = have.chain_rules(chain).collect();
            if want_rules == have_rules {
                continue;
            }
            let mut unmatched = have_rules.clone();
            for rule in &want_rules {
                match unmatched.iter().position(|r| r == rule) {
                    Some(i) => {
                        unmatched.remove(i);
                    }
                    None => out.missing.push(format!("{t}: {rule}")),
                }
            }
            out.extra
                .extend(unmatched.iter().map(|r| format!("{t}: {r}")));
            if out.is_clean() {
                // Same rules, wrong order: order matters to netfilter.
                out.extra
                    .push(format!("{t}: rules of {chain} out of order"));
            }
        }
    }
    for f in foreign_chains(expected, saved) {
        out.extra
            .push(format!("{}: chain {} is not ours", f.table, f.chain));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::render::{render, Family, RuleConfig};

    const SPEC: &str = include_str!("../../testdata/spec-iptables-save.txt");

    #[test]
    fn the_specifications_dump_has_no_drift() {
        let saved = parse_save(SPEC).unwrap();
        assert_eq!(
            drift(&render(&RuleConfig::default(), Family::V4), &saved),
            Drift::default()
        );
    }

    #[test]
    fn missing_extra_duplicated_and_reordered_rules_are_reported() {
        let expected = render(&RuleConfig::default(), Family::V4);
        let mut saved = parse_save(SPEC).unwrap();
        let mangle = &mut saved[0];
        let removed = mangle.rules.remove(4);
        mangle.rules.push("-A ISTIO_PRERT -p udp -j ACCEPT".into());
        mangle.rules.push("-A PREROUTING -j ISTIO_PRERT".into());
        // Someone else's rules are not our business.
        mangle.rules.push("-A PREROUTING -j CNI_SOMETHING".into());
        let d = drift(&expected, &saved);
        assert_eq!(d.missing, vec![format!("mangle: {removed}")]);
        assert_eq!(
            d.extra,
            vec![
                "mangle: -A PREROUTING -j ISTIO_PRERT".to_string(),
                "mangle: -A ISTIO_PRERT -p udp -j ACCEPT".to_string()
            ]
        );

        let mut swapped = parse_save(SPEC).unwrap();
        swapped[1].rules.swap(1, 2);
        let d = drift(&expected, &swapped);
        assert!(d.missing.is_empty());
        assert_eq!(
            d.extra,
            vec!["nat: rules of ISTIO_OUTPUT out of order".to_string()]
        );
    }

    #[test]
    fn an_empty_netns_misses_everything() {
        let d = drift(&render(&RuleConfig::default(), Family::V4), &[]);
        assert_eq!(d.missing.len(), 3 + 3 + 11);
        assert!(d.extra.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_save("-A FOO -j BAR\n").is_err());
        assert!(parse_save("*mangle\n-A X -j Y\n").is_err());
        assert!(parse_save("*nat\nwhat\nCOMMIT\n").is_err());
        assert!(parse_save("*nat\n:\nCOMMIT\n").is_err());
        let counted =
            parse_save("*nat\n:OUTPUT ACCEPT [1:2]\n[3:4] -A OUTPUT -j X\nCOMMIT\n").unwrap();
        assert_eq!(counted[0].rules, vec!["-A OUTPUT -j X"]);
    }
}
