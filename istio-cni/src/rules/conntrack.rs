//! Flushing a pod's redirected connections from conntrack after its rules are removed,
//! so flows NATed to ztunnel's ports do not linger on a mapping that no longer exists.

use protocol::Netns;

use super::render::{Family, RuleConfig};
use crate::exec::{self, ExecError};

/// Deletes `family`'s entries of redirected flows: those carrying the redirect connmark
/// (inbound, via TPROXY) and those NATed to the outbound capture port.
pub fn flush_redirected(netns: &Netns, cfg: &RuleConfig, family: Family) -> Result<(), ExecError> {
    let mark = format!("0x{:x}/0x{:x}", cfg.redirect_mark, cfg.mark_mask);
    let port = cfg.outbound_port.to_string();
    let f = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    for args in [
        vec!["-f", f, "-D", "--mark", mark.as_str()],
        vec![
            "-f",
            f,
            "-D",
            "-p",
            "tcp",
            "--reply-port-src",
            port.as_str(),
        ],
    ] {
        let mut cmd = exec::in_netns(netns, "conntrack");
        cmd.args(&args);
        match exec::run(cmd, None) {
            Ok(_) => {}
            // conntrack exits 1 when nothing matched; that is success here.
            Err(ExecError::Failed { stderr, .. }) if stderr.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
