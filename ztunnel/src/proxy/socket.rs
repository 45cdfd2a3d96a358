//! The proxy's sockets: how each is made, with which options, wherever the
//! [`super::seam::SocketFactory`] makes it (inside a pod's netns in in-pod mode).
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

/// TCP keepalive on proxied connections (Istio's `KEEPALIVE_*` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub time: std::time::Duration,
    pub interval: std::time::Duration,
    pub retries: u32,
    /// Also set TCP_USER_TIMEOUT to time + retries x interval.
    pub user_timeout: bool,
}

fn tcp_socket(domain: Domain, mark: u32, keepalive: Option<Keepalive>) -> io::Result<Socket> {
    // Non-blocking from the start: two fcntl calls fewer per socket, and this runs for
    // every upstream connection.
    let socket = Socket::new(
        domain,
        Type::STREAM.cloexec().nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
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

/// A listening socket at `addr` in the calling thread's netns; at `[::]` it is
/// dual-stack (`IPV6_V6ONLY` off): IPv4 peers arrive as IPv4-mapped addresses.
pub fn listener(addr: SocketAddr, opts: ListenerOpts) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(Domain::for_address(addr), opts.mark, opts.keepalive)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
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

/// The three listeners of `specs` (port, options), each one dual-stack socket at
/// `[::]` when `ipv6`, IPv4 only where the kernel has no IPv6 or it is off; all
/// three or none (a failure drops the ones already bound). In the calling thread's
/// netns.
pub fn listen_all(
    ipv6: bool,
    specs: [(u16, ListenerOpts); 3],
) -> io::Result<[std::net::TcpListener; 3]> {
    let listen = |any: IpAddr, (port, o): (u16, ListenerOpts)| {
        let addr = SocketAddr::new(any, port);
        listener(addr, o).map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))
    };
    let all = |any: IpAddr| -> io::Result<_> {
        let [a, b, c] = specs;
        Ok([listen(any, a)?, listen(any, b)?, listen(any, c)?])
    };
    if ipv6 {
        match all(Ipv6Addr::UNSPECIFIED.into()) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EAFNOSUPPORT) | Some(nix::libc::EADDRNOTAVAIL)
                ) => {}
            other => return other,
        }
    }
    all(Ipv4Addr::UNSPECIFIED.into())
}

/// The IPv6 addresses of the calling thread's netns.
pub fn ipv6_addresses() -> io::Result<Vec<Ipv6Addr>> {
    let all = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(all
        .filter_map(|a| a.address?.as_sockaddr_in6().map(|s| s.ip()))
        .collect())
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
        // IP_TRANSPARENT (SOL_IP) applies to IPv6 sockets too: the kernel keeps one
        // transparent flag per socket, which IPV6_TRANSPARENT also sets.
        socket.set_ip_transparent(true)?;
        if dest.is_ipv6() {
            socket.set_freebind_ipv6(true)?;
        } else {
            socket.set_freebind(true)?;
        }
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

/// `addr` with an IPv4-mapped IPv6 address (how a dual-stack socket shows an IPv4
/// peer) written as the IPv4 address it is: policy, lookups, logs and transparent binds
/// all see one form per address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The destination an outbound connection had before the pod's nat rule redirected it:
/// `SO_ORIGINAL_DST` for IPv4 (also an IPv4 connection on a dual-stack socket),
/// `IP6T_SO_ORIGINAL_DST` for IPv6.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let sock = socket2::SockRef::from(stream);
    let addr = if local.ip().to_canonical().is_ipv4() {
        sock.original_dst()?
    } else {
        sock.original_dst_ipv6()?
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}
