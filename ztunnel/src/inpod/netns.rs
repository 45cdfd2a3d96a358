//! A pod's netns as ztunnel uses it: a dedicated thread that lives inside the netns and
//! creates sockets there on request.
//!
//! A socket belongs forever to the netns its creating thread was in. Rather than move
//! tokio workers in and out of namespaces, each pod gets one small thread that enters
//! the pod's netns once and only ever makes sockets; the sockets are then used from
//! the normal runtime like any other.

use std::io;
use std::sync::mpsc;

use protocol::{Netns, NetnsId};

type Job = Box<dyn FnOnce() + Send>;

/// A socket factory inside one pod's network namespace.
#[derive(Debug)]
pub struct InpodNetns {
    id: NetnsId,
    jobs: mpsc::Sender<Job>,
}

impl InpodNetns {
    /// Starts the pod's socket thread; fails if it cannot enter the netns.
    pub fn new(netns: Netns) -> io::Result<Self> {
        let id = netns.id();
        let (jobs, rx) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("netns-{}", id.inode))
            .stack_size(256 * 1024)
            .spawn(move || {
                let entered = netns.enter();
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                drop(netns);
                if ok {
                    // Ends when the last sender (the InpodNetns) is dropped.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        entered_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread exited before entering the netns"))??;
        Ok(InpodNetns { id, jobs })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Runs `f` on the pod's socket thread (inside its netns) and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("pod netns thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("pod netns thread dropped the request"))?
    }
}
