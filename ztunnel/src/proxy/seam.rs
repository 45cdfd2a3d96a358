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
use std::time::Duration;

use protocol::zds::WorkloadInfo;
use protocol::WorkloadUid;

use super::socket::{self, Keepalive, ListenerOpts};
use super::Direction;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where one pod's sockets are made. An implementation gives one thing, the place
/// ([`SocketFactory::make_there`]); the proxy's sockets are made by the provided
/// methods, with the same options wherever that is. A test on loopback overrides the
/// methods that need privileges or nat (listeners, [`SocketFactory::destination`],
/// [`SocketFactory::connect`]) to stand in for the pod's network.
pub trait SocketFactory: Send + Sync + 'static {
    /// Runs `make` (plain syscalls that neither block for long nor yield) where the
    /// pod's sockets belong, on the calling thread.
    fn make_there(&self, make: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()>;

    /// The pod's three listeners ([`socket::listen_all`]).
    fn listeners(
        &self,
        ipv6: bool,
        specs: [(u16, ListenerOpts); 3],
    ) -> io::Result<[std::net::TcpListener; 3]> {
        made(self, || socket::listen_all(ipv6, specs))
    }

    /// Connects to `dest` from where the pod's sockets are made, within `timeout`:
    /// the socket is made there ([`socket::upstream`]), then connected.
    fn connect(
        &self,
        dest: SocketAddr,
        how: Upstream,
        timeout: Duration,
    ) -> BoxFuture<io::Result<tokio::net::TcpStream>> {
        let made = made(self, || {
            socket::upstream(dest, how.mark, how.keepalive, how.source)
        });
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::from_std_stream(made?);
            tokio::time::timeout(timeout, socket.connect(dest))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
        })
    }

    /// Where a connection accepted on the listener of `direction` was going: for the
    /// app's outgoing connections (redirected by the pod's nat rule) the original
    /// destination conntrack kept; for inbound ones (delivered by TPROXY) the local
    /// address.
    fn destination(
        &self,
        stream: &tokio::net::TcpStream,
        direction: Direction,
    ) -> io::Result<SocketAddr> {
        match direction {
            Direction::Outbound => socket::original_dst(stream),
            Direction::InboundPlaintext | Direction::InboundHbone => {
                stream.local_addr().map(socket::canonical)
            }
        }
    }

    /// The IPv6 addresses where the sockets are made.
    fn ipv6_addresses(&self) -> io::Result<Vec<Ipv6Addr>> {
        made(self, socket::ipv6_addresses)
    }
}

/// What `f` makes, made where `factory` makes sockets.
fn made<F: SocketFactory + ?Sized, T>(
    factory: &F,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let mut out = None;
    factory.make_there(&mut || {
        out = Some(f()?);
        Ok(())
    })?;
    out.ok_or_else(|| io::Error::other("the socket factory did not run the maker"))
}

/// How an upstream connection is made: the mark, keepalive and, for a transparent
/// connection, the (foreign) source address.
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    pub mark: u32,
    pub keepalive: Option<Keepalive>,
    pub source: Option<IpAddr>,
}

/// A pod's proxy once started: drained (listeners closed, connections given the
/// grace period) when the pod goes.
pub trait RunningProxy: Send {
    fn drain(self: Box<Self>) -> BoxFuture<()>;
}

/// Why a pod's proxy did not start. Each is retried by the state manager: a pod's
/// netns can get its listeners' ports back, or its addresses change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its sockets could not be made (a port taken, the netns gone).
    #[error("starting proxy in pod netns: {0}")]
    Sockets(#[source] io::Error),
    /// Its addresses could not be read.
    #[error("reading the pod's addresses: {0}")]
    Addresses(#[source] io::Error),
    /// It has a routable IPv6 address while ztunnel serves IPv4 only: its IPv6 traffic
    /// would go around ztunnel.
    #[error("the pod has the IPv6 address {0} and IPV6_ENABLED is off: refusing it, its IPv6 traffic would bypass ztunnel")]
    Ipv6Off(Ipv6Addr),
    /// What a test's fake factory reports.
    #[cfg(test)]
    #[error("{0}")]
    Other(String),
}

/// Starts a pod's proxy on the sockets `sockets` makes; tests use fakes. The state
/// manager never builds a proxy itself.
pub trait ProxyFactory: Send + Sync + 'static {
    fn start(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        sockets: Arc<dyn SocketFactory>,
    ) -> BoxFuture<Result<Box<dyn RunningProxy>, StartError>>;
}
