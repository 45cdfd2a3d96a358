//! A pod's netns as ztunnel uses it: sockets are created inside it by briefly moving
//! the *calling* thread into it.
//!
//! A socket belongs forever to the netns its creating thread was in. [`InpodNetns::run`]
//! enters the pod's netns, runs a closure of plain syscalls (socket, setsockopt, bind,
//! listen, getifaddrs: nothing that can yield, so no other task runs on this thread
//! meanwhile) and returns to ztunnel's own netns before anything else happens on the
//! thread. The sockets are then used from the runtime like any other.
//!
//! This used to be a dedicated thread per pod, fed over a channel: a thread (and its
//! stack) per enrolled pod, and a cross-thread hop for every upstream connection. Two
//! `setns` calls cost less than that hop and nothing per idle pod.
//!
//! Fail closed: if the thread cannot get back to ztunnel's netns, the process aborts
//! rather than let a runtime worker create later sockets in the wrong pod.

use std::io;
use std::sync::OnceLock;

use protocol::{Netns, NetnsId};

use crate::proxy::seam::SocketFactory;

/// ztunnel's own netns, where every thread lives outside [`InpodNetns::run`].
static HOME: OnceLock<Netns> = OnceLock::new();

fn home() -> io::Result<&'static Netns> {
    if let Some(h) = HOME.get() {
        return Ok(h);
    }
    // Outside `run` every thread is in ztunnel's netns, so this one is too.
    let current = Netns::current()?;
    Ok(HOME.get_or_init(|| current))
}

/// Puts the thread back into ztunnel's netns when dropped (also when the closure
/// panics), or aborts.
struct BackHome(&'static Netns);

impl Drop for BackHome {
    fn drop(&mut self) {
        if let Err(e) = self.0.enter() {
            // A worker left inside a pod's netns would create other pods' sockets
            // there: stopping is the only safe outcome.
            eprintln!("ztunnel: cannot return to its own network namespace ({e}); aborting");
            std::process::abort();
        }
    }
}

/// A socket factory inside one pod's network namespace.
#[derive(Debug)]
pub struct InpodNetns {
    netns: Netns,
}

impl InpodNetns {
    /// Holds the pod's netns. Whether it can be entered shows at the first
    /// [`InpodNetns::run`] (the listeners, right after): no separate trip in and out.
    pub fn new(netns: Netns) -> Self {
        InpodNetns { netns }
    }

    pub fn id(&self) -> NetnsId {
        self.netns.id()
    }

    /// Runs `f` inside the pod's netns, on this thread, and returns its result. `f`
    /// must not block for long or yield: it runs with the thread out of ztunnel's
    /// netns.
    pub async fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.enter_and(f)
    }

    fn enter_and<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = home()?;
        self.netns.enter()?;
        let _back = BackHome(home);
        f()
    }
}

/// In-pod mode's sockets: the proxy's, made inside the pod's netns.
impl SocketFactory for InpodNetns {
    fn make_there(&self, make: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        self.enter_and(make)
    }
}
