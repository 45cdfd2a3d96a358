//! The proxy's two seams, both owned here: what it needs from whoever hands it a
//! pod ([`SocketFactory`]: where the pod's sockets are made; in-pod mode makes them
//! inside the pod's netns, `inpod::netns`), and what it offers the in-pod state
//! manager ([`ProxyFactory`]: start a pod's proxy on those sockets). `inpod` depends on
//! `proxy` through these, never the other way.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;

use super::socket::{self, Keepalive, ListenerOpts};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where one pod's sockets are made. Every method runs to completion without
/// yielding (plain syscalls), so an implementation may move the calling thread into
/// another netns for its duration.
pub trait SocketFactory: Send + Sync + 'static {
    /// The pod's three listeners ([`socket::listen_all`]).
    fn listeners(
        &self,
        ipv6: bool,
        specs: [(u16, ListenerOpts); 3],
    ) -> io::Result<[std::net::TcpListener; 3]>;
    /// An unconnected socket towards `dest` ([`socket::upstream`]).
    fn upstream(
        &self,
        dest: SocketAddr,
        mark: u32,
        keepalive: Option<Keepalive>,
        source: Option<IpAddr>,
    ) -> io::Result<std::net::TcpStream>;
    /// The IPv6 addresses where the sockets are made.
    fn ipv6_addresses(&self) -> io::Result<Vec<Ipv6Addr>>;
}

/// Sockets made where the calling thread is (ztunnel's own netns): for tests on
/// loopback.
pub struct HostSockets;

impl SocketFactory for HostSockets {
    fn listeners(
        &self,
        ipv6: bool,
        specs: [(u16, ListenerOpts); 3],
    ) -> io::Result<[std::net::TcpListener; 3]> {
        socket::listen_all(ipv6, specs)
    }

    fn upstream(
        &self,
        dest: SocketAddr,
        mark: u32,
        keepalive: Option<Keepalive>,
        source: Option<IpAddr>,
    ) -> io::Result<std::net::TcpStream> {
        socket::upstream(dest, mark, keepalive, source)
    }

    fn ipv6_addresses(&self) -> io::Result<Vec<Ipv6Addr>> {
        socket::ipv6_addresses()
    }
}

/// A pod's proxy once started: drained (listeners closed, connections given the
/// grace period) when the pod goes.
pub trait RunningProxy: Send {
    fn drain(self: Box<Self>) -> BoxFuture<()>;
}

/// Starts a pod's proxy on the sockets `sockets` makes; tests use fakes. The state
/// manager never builds a proxy itself.
pub trait ProxyFactory: Send + Sync + 'static {
    fn start(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        sockets: Arc<dyn SocketFactory>,
    ) -> BoxFuture<Result<Box<dyn RunningProxy>, String>>;
}
