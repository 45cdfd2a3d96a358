//! One row per fault, the columns that must be zero, and how the table is printed
//! (Markdown on the terminal, JSON under `target/chaos/`). Pure.

use serde::Serialize;

/// What one fault did to the pods' traffic and to the node.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Row {
    pub fault: String,
    /// Whether the run's verdict counts this row (see `Fault::gated`).
    pub gated: bool,
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Plaintext payload bytes (of mesh-to-mesh flows) seen leaving an enrolled pod.
    /// Must be 0.
    pub plaintext_bytes: u64,
    /// Connections that reached an enrolled pod's app without passing ztunnel (the
    /// app saw the client's own source port). Must be 0.
    pub inbound_bypass: u64,
    /// From the fault to the first mesh-to-mesh success after the last failure;
    /// `None` when nothing failed.
    pub recovery_ms: Option<u64>,
    /// Processes that died without being killed, or panicked. Must be 0.
    pub crashed: u64,
    /// What was left behind once the fault was over (fds, netns, rules, set
    /// entries). Must be empty.
    pub leaked: Vec<String>,
}

impl Row {
    /// The must-be-0 columns that are not.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.plaintext_bytes > 0 {
            out.push(format!(
                "{}: {} plaintext bytes",
                self.fault, self.plaintext_bytes
            ));
        }
        if self.inbound_bypass > 0 {
            out.push(format!(
                "{}: {} inbound connections bypassed ztunnel",
                self.fault, self.inbound_bypass
            ));
        }
        if self.crashed > 0 {
            out.push(format!("{}: {} crashed", self.fault, self.crashed));
        }
        for l in &self.leaked {
            out.push(format!("{}: leaked {l}", self.fault));
        }
        out
    }

    /// What the pods' traffic did, in words.
    pub fn behaviour(&self) -> String {
        match self.recovery_ms {
            None => "continues".into(),
            Some(ms) => format!("fails closed, flows again after {ms} ms"),
        }
    }
}

/// The table in Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| fault | attempted | ok | failed | plaintext bytes (0) | inbound bypass (0) | traffic | crashed (0) | leaked (none) |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.fault,
            if r.gated { "" } else { " (not gated)" },
            r.attempted,
            r.succeeded,
            r.failed,
            r.plaintext_bytes,
            r.inbound_bypass,
            r.behaviour(),
            r.crashed,
            if r.leaked.is_empty() {
                "none".to_string()
            } else {
                r.leaked.join("; ")
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_row_has_no_violation_and_a_dirty_one_names_each() {
        let clean = Row {
            fault: "ztunnel SIGKILL".into(),
            gated: true,
            attempted: 10,
            succeeded: 8,
            failed: 2,
            recovery_ms: Some(420),
            ..Default::default()
        };
        assert!(clean.violations().is_empty());
        assert_eq!(clean.behaviour(), "fails closed, flows again after 420 ms");
        let dirty = Row {
            fault: "x".into(),
            gated: false,
            plaintext_bytes: 3,
            inbound_bypass: 1,
            crashed: 1,
            leaked: vec!["2 netns".into()],
            ..Default::default()
        };
        assert_eq!(dirty.violations().len(), 4);
        let md = markdown(&[clean, dirty]);
        assert!(md.contains("| ztunnel SIGKILL | 10 | 8 | 2 | 0 | 0 | fails closed, flows again after 420 ms | 0 | none |"));
        assert!(md.contains("| x (not gated) | 0 | 0 | 0 | 3 | 1 | continues | 1 | 2 netns |"));
    }
}
