//! Running the node's networking tools (iptables-restore, ip, conntrack) and turning
//! their failures into errors that say what ran and what it printed.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {program}: {source}{hint}")]
    Spawn {
        program: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A command for `program` whose process starts inside `netns`.
pub fn in_netns(netns: &protocol::Netns, program: &str) -> Result<Command, ExecError> {
    netns.command(program).map_err(|source| ExecError::Spawn {
        program: program.to_string(),
        source,
        hint: "",
    })
}

/// Runs `cmd` to completion, feeding it `stdin`; returns its stdout.
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Result<String, ExecError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let command = std::iter::once(program.clone())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_err = |source: std::io::Error| ExecError::Spawn {
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            " (is the package that provides it installed? iptables, iproute2 and conntrack are needed)"
        } else {
            ""
        },
        program: program.clone(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status tells why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ExecError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
