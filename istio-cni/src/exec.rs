//! Running the node's networking tools (iptables-restore, ip, conntrack) and turning
//! their failures into errors that say what ran and what it printed.

use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};

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

/// A command whose process starts inside a network namespace.
///
/// It is spawned from a short-lived thread that has entered the netns, and inherits
/// it from that thread: the spawn can then be a `posix_spawn` (a vfork), where a
/// `pre_exec` hook that enters the netns in the child would force a full `fork` of
/// the agent: page tables and all, a millisecond or more per process on the path
/// of every CNI ADD (iptables-save, iptables-restore, ip, …).
pub struct InNetns<'a> {
    netns: &'a protocol::Netns,
    cmd: Command,
}

impl Deref for InNetns<'_> {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.cmd
    }
}

impl DerefMut for InNetns<'_> {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.cmd
    }
}

/// Something [`run`] can start: a command on the host, or one in a netns.
pub trait Spawn {
    fn command(&mut self) -> &mut Command;
    fn start(&mut self) -> std::io::Result<Child>;
}

impl Spawn for Command {
    fn command(&mut self) -> &mut Command {
        self
    }
    fn start(&mut self) -> std::io::Result<Child> {
        self.spawn()
    }
}

impl Spawn for InNetns<'_> {
    fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }
    fn start(&mut self) -> std::io::Result<Child> {
        let cmd = &mut self.cmd;
        self.netns.run(|| cmd.spawn())?
    }
}

/// A command for `program` whose process starts inside `netns`.
pub fn in_netns<'a>(netns: &'a protocol::Netns, program: &str) -> InNetns<'a> {
    InNetns {
        netns,
        cmd: Command::new(program),
    }
}

/// Runs `cmd` to completion, feeding it `stdin`; returns its stdout.
pub fn run(mut job: impl Spawn, stdin: Option<&str>) -> Result<String, ExecError> {
    let cmd = job.command();
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
    let mut child = job.start().map_err(spawn_err)?;
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
