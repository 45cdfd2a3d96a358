//! The "apps" in test pods: a TCP server that tells each client the peer address it
//! sees and echoes what it gets, and a client. Their sockets are created inside the
//! pod's netns, so the pod's redirection applies to them exactly as to a real app.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::node::TestPod;

/// An echo server in a pod; stopped on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// The server's address at `ip` (another of its pod's addresses).
    pub fn at(&self, ip: std::net::IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.addr.port())
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the server on `port` in `pod` (both families). Each connection first gets
/// `peer=<addr>\n`. `addr` is the pod's first address; see [`EchoServer::at`].
pub async fn echo_server(pod: &TestPod, port: u16) -> EchoServer {
    serve(pod, port, None).await
}

/// Like [`echo_server`], with a second greeting line `server=<pod name>\n`.
pub async fn named_echo_server(pod: &TestPod, port: u16) -> EchoServer {
    serve(pod, port, Some(format!("server={}\n", pod.name))).await
}

async fn serve(pod: &TestPod, port: u16, greeting: Option<String>) -> EchoServer {
    // One dual-stack socket, as most apps listen: IPv4 peers come as mapped addresses.
    let std_listener = pod
        .netns()
        .run(move || -> io::Result<std::net::TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .and_then(|r| r)
        .expect("bind app server in pod");
    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let greeting = greeting.clone().unwrap_or_default();
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("peer={peer}\n{greeting}").as_bytes())
                    .await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    EchoServer {
        addr: SocketAddr::new(pod.ip, port),
        task,
    }
}

/// Connects from inside `pod` to `dst`.
pub async fn connect(pod: &TestPod, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let std_stream = pod.netns().run(|| -> io::Result<std::net::TcpStream> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_nonblocking(true)?;
        Ok(std::net::TcpStream::from(std::os::fd::OwnedFd::from(s)))
    })??;
    tokio::time::timeout(timeout, TcpSocket::from_std_stream(std_stream).connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// One request: connect, send `hello\n`, half-close, read everything back.
/// Returns what the server said: `peer=<addr>\nhello\n` from the echo server.
pub async fn request(pod: &TestPod, dst: SocketAddr, timeout: Duration) -> io::Result<String> {
    exchange(pod, dst, "hello\n", timeout).await
}

/// Like [`request`], sending `payload`.
pub async fn exchange(
    pod: &TestPod,
    dst: SocketAddr,
    payload: &str,
    timeout: Duration,
) -> io::Result<String> {
    let mut stream = connect(pod, dst, timeout).await?;
    let exchange = async {
        stream.write_all(payload.as_bytes()).await?;
        stream.shutdown().await?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await?;
        Ok::<_, io::Error>(out)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

/// The peer address an echo server reported.
pub fn seen_peer(response: &str) -> Option<std::net::IpAddr> {
    let first = response.lines().next()?.strip_prefix("peer=")?;
    first.parse::<SocketAddr>().ok().map(|a| a.ip())
}
