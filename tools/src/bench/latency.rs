//! Request/response and connection-setup latency between two pods, measured by a
//! client thread and a server thread of this process, each living in its pod's netns
//! (entered once, for the thread's life) and optionally pinned to a CPU. Plain
//! blocking sockets: what is measured is the path, not an async runtime.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::Netns;

use super::procfs;

/// Bytes each way in one round trip.
pub const MESSAGE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One connection, many 64-byte round trips.
    RoundTrip,
    /// Per sample: connect, one 64-byte round trip, close.
    Connect,
}

/// A server answering every 64-byte message with 64 bytes, one connection at a time,
/// until dropped.
pub struct Server {
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: Netns, port: u16, cpu: Option<usize>) -> anyhow::Result<Server> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let setup = (|| {
                netns.enter()?;
                if let Some(cpu) = cpu {
                    procfs::pin_current_thread(Some(&[cpu]))?;
                }
                TcpListener::bind(("0.0.0.0", port))
            })();
            let listener = match setup.and_then(|l| Ok((l.try_clone()?, l))) {
                Ok((mine, theirs)) => {
                    let _ = tx.send(Ok(theirs));
                    mine
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // Ends when the listener is shut down (accept fails).
            while let Ok((conn, _)) = listener.accept() {
                let _ = serve(conn);
            }
        });
        let listener = rx
            .recv()
            .context("latency server thread died")?
            .context("latency server")?;
        Ok(Server {
            listener,
            thread: Some(thread),
        })
    }
}

fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = [0u8; MESSAGE];
    loop {
        match conn.read_exact(&mut buf) {
            Ok(()) => conn.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Shutting a listening socket down wakes a thread blocked in accept().
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `samples` timed operations (after `warmup` untimed ones) from a thread in
/// `netns` against `to`; returns each one's latency in microseconds.
pub fn client(
    netns: Netns,
    to: SocketAddr,
    mode: Mode,
    warmup: usize,
    samples: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Vec<f64>> {
    std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        netns.enter().context("entering the client pod")?;
        if let Some(cpu) = cpu {
            procfs::pin_current_thread(Some(&[cpu]))?;
        }
        let connect = || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        };
        let msg = [0x5au8; MESSAGE];
        let mut buf = [0u8; MESSAGE];
        let mut out = Vec::with_capacity(samples);
        // Round trips keep one connection (made in the first, untimed, warm-up
        // operation); connection setup makes one per operation and closes it before
        // the clock stops.
        let mut kept: Option<TcpStream> = None;
        for i in 0..warmup + samples {
            let start = Instant::now();
            let s = match &mut kept {
                Some(s) => s,
                none => none.insert(connect()?),
            };
            s.write_all(&msg)?;
            s.read_exact(&mut buf).context("reading the answer")?;
            if mode == Mode::Connect {
                kept = None;
            }
            if i >= warmup {
                out.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("latency client thread panicked"))?
}
