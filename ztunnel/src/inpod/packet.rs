//! Socket options for sockets made inside a pod's netns.
//!
//! - `SO_MARK` on every socket (listeners and upstream connections): the pod's rules
//!   let marked packets through, so ztunnel's own traffic is not captured again.
//! - `IP_TRANSPARENT` on listeners that receive TPROXY'd traffic (without it the kernel
//!   drops those packets silently) and on upstream sockets bound to a foreign address
//!   (the client's, so the app sees the real source).
//! - `SO_REUSEPORT` on listeners when port reuse is on, so a new ztunnel can bind
//!   beside the old one during an upgrade.
//! - TCP keepalive (and optionally `TCP_USER_TIMEOUT`) on every socket: a half-open
//!   peer is found and its connection closed instead of holding a task, an fd and the
//!   relay buffers forever. Accepted connections inherit it from their listener.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use crate::proxy::Keepalive;

fn tcp_socket(domain: Domain, mark: u32, keepalive: Option<Keepalive>) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    if let Some(k) = keepalive {
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(k.time)
                .with_interval(k.interval)
                .with_retries(k.retries),
        )?;
        if k.user_timeout {
            let total = k.time + k.interval * k.retries;
            socket.set_tcp_user_timeout(Some(total))?;
        }
    }
    Ok(socket)
}

/// How to make a listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerOpts {
    pub mark: u32,
    pub transparent: bool,
    pub reuse_port: bool,
    pub keepalive: Option<Keepalive>,
}

/// A listening socket at `addr` in the calling thread's netns.
pub fn listener(addr: SocketAddr, opts: ListenerOpts) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(Domain::for_address(addr), opts.mark, opts.keepalive)?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if opts.transparent {
        socket.set_ip_transparent(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// An unconnected TCP socket for `dest`, in the calling thread's netns, carrying
/// `mark`. With `source`, it is bound to that (possibly foreign) address.
pub fn upstream(
    dest: SocketAddr,
    mark: u32,
    keepalive: Option<Keepalive>,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let socket = tcp_socket(Domain::for_address(dest), mark, keepalive)?;
    if let Some(ip) = source {
        socket.set_ip_transparent(true)?;
        socket.set_freebind(true)?;
        // Let connect() pick the source port knowing the whole 4-tuple; a port picked
        // at bind time can clash with a recent connection under churn.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(io::Error::from)?;
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    Ok(std::net::TcpStream::from(std::os::fd::OwnedFd::from(
        socket,
    )))
}

/// The destination an outbound connection had before the pod's nat rule redirected it.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let addr = socket2::SockRef::from(stream).original_dst()?;
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}
