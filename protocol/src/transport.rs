//! One ZDS message per `SOCK_SEQPACKET` datagram, with at most one fd attached.
//!
//! Seqpacket keeps message boundaries, so there is no length prefix; a datagram larger
//! than the receive buffer, or one with more control data than expected, is reported
//! as truncated instead of being silently cut. A zero-length read is end of stream.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socketpair, sockopt,
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, UnixCredentials,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::Error;

/// The timeout ZDS uses for each write and each ack.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest datagram accepted. ZDS messages are a few hundred bytes at most.
pub const MAX_DATAGRAM: usize = 16 * 1024;

/// Room for this many fds in the control buffer: the kernel's limit per message
/// (SCM_MAX_FD), so however many a peer attaches, we receive and close them all rather
/// than have a truncated control message whose installed fds could not be parsed.
const MAX_FDS: usize = 253;

/// A received datagram: the message bytes and the fd that came with it, if any.
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub fd: Option<OwnedFd>,
}

fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, Error> {
    // SAFETY: an OwnedFd is an open descriptor that it alone owns; it stays open and
    // `as_raw_fd` returns the same number until the AsyncFd (which owns it) drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| Error::io("register with tokio")(e.into()))
}

/// A connected seqpacket Unix socket, driven by tokio.
#[derive(Debug)]
pub struct SeqpacketConn {
    fd: AsyncFd<OwnedFd>,
}

fn seqpacket_socket() -> Result<OwnedFd, Error> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socket")(e.into()))
}

impl SeqpacketConn {
    fn from_fd(fd: OwnedFd) -> Result<Self, Error> {
        Ok(SeqpacketConn { fd: register(fd)? })
    }

    /// Connects to the listener at `path`.
    pub async fn connect(path: &Path) -> Result<Self, Error> {
        let fd = seqpacket_socket()?;
        let addr = UnixAddr::new(path).map_err(|e| Error::io("connect")(e.into()))?;
        // A Unix connect completes at once or fails at once (EAGAIN: backlog full).
        connect(fd.as_raw_fd(), &addr).map_err(|e| {
            Error::io("connect")(io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        Self::from_fd(fd)
    }

    /// A connected pair, for tests and in-process peers.
    pub fn pair() -> Result<(Self, Self), Error> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::io("socketpair")(e.into()))?;
        Ok((Self::from_fd(a)?, Self::from_fd(b)?))
    }

    /// Credentials of the process at the other end (as of connect).
    pub fn peer_credentials(&self) -> Result<UnixCredentials, Error> {
        getsockopt(self.fd.get_ref(), sockopt::PeerCredentials)
            .map_err(|e| Error::io("SO_PEERCRED")(e.into()))
    }

    /// A pidfd of the process at the other end (`SO_PEERPIDFD`, Linux 6.5 and later):
    /// unlike SO_PEERCRED's pid, which is 0 when the peer runs in a PID namespace the
    /// caller cannot see (ztunnel's pod, seen from the agent's), it names the process
    /// whatever namespace it is in.
    pub fn peer_pidfd(&self) -> Result<OwnedFd, Error> {
        /// `SO_PEERPIDFD` (the same on every architecture this builds for).
        const SO_PEERPIDFD: nix::libc::c_int = 77;
        let mut fd: nix::libc::c_int = -1;
        let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `fd`, an int that lives
        // across the call, and stores the length it wrote in `len`; the socket fd is
        // valid for the duration (borrowed from `self`).
        let r = unsafe {
            nix::libc::getsockopt(
                self.fd.get_ref().as_raw_fd(),
                nix::libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut nix::libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || fd < 0 {
            return Err(Error::io("SO_PEERPIDFD")(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just created this fd for us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sends one datagram, with `fd` attached when given.
    pub async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), Error> {
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let sent = self
            .fd
            .async_io(Interest::WRITABLE, |sock| {
                let iov = [IoSlice::new(bytes)];
                let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await
            .map_err(Error::io("send"))?;
        if sent != bytes.len() {
            return Err(Error::io("send")(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", bytes.len()),
            )));
        }
        Ok(())
    }

    /// Receives one datagram. Fails on end of stream, truncation, or more than one fd.
    pub async fn recv(&self) -> Result<Datagram, Error> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (len, flags, mut fds) = self
            .fd
            .async_io(Interest::READABLE, |sock| {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let msg = recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    // Cannot happen with room for SCM_MAX_FD fds and no other control
                    // messages enabled; nix refuses to parse a truncated buffer.
                    return Ok((msg.bytes, msg.flags, fds));
                }
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel just installed these descriptors in our
                        // table for this message; nothing else knows or owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                Ok((msg.bytes, msg.flags, fds))
            })
            .await
            .map_err(Error::io("recv"))?;
        // From here on every fd is owned: any early return closes them.
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(Error::Truncated {
                limit: MAX_DATAGRAM,
            });
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(Error::ControlTruncated);
        }
        if len == 0 && fds.is_empty() {
            return Err(Error::Closed);
        }
        if fds.len() > 1 {
            return Err(Error::TooManyFds { count: fds.len() });
        }
        buf.truncate(len);
        Ok(Datagram {
            bytes: buf,
            fd: fds.pop(),
        })
    }

    /// [`send`](Self::send) bounded by `after`.
    pub async fn send_timeout(
        &self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
        after: Duration,
    ) -> Result<(), Error> {
        with_timeout("send", after, self.send(bytes, fd)).await
    }

    /// [`recv`](Self::recv) bounded by `after`.
    pub async fn recv_timeout(&self, after: Duration) -> Result<Datagram, Error> {
        with_timeout("recv", after, self.recv()).await
    }

    /// Waits until the socket has something to read (a message or end of stream).
    /// Readiness is confirmed with a non-blocking peek, so a stale wake-up never makes
    /// a following [`recv`](Self::recv) block.
    pub async fn readable(&self) -> Result<(), Error> {
        loop {
            let mut guard = self.fd.readable().await.map_err(Error::io("poll"))?;
            let peeked = guard.try_io(|sock| {
                socket::recv(
                    sock.as_raw_fd(),
                    &mut [0u8; 1],
                    MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)
            });
            match peeked {
                Ok(_) => return Ok(()),
                Err(_would_block) => continue,
            }
        }
    }
}

async fn with_timeout<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| Error::Timeout { op, after })?
}

/// A listening seqpacket Unix socket at a filesystem path.
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// Inode of the socket file we created, so drop removes only our own file.
    inode: u64,
}

impl SeqpacketListener {
    /// Binds at `path` with permission bits `mode`, replacing a stale socket there.
    ///
    /// The socket is bound under a temporary name, given its mode, then renamed over
    /// `path`: nobody ever sees it with looser permissions, and a stale socket left by
    /// a previous run is replaced atomically. A non-socket file at `path` is an error.
    pub fn bind(path: &Path, mode: u32) -> Result<Self, Error> {
        let bind_err = |e: io::Error| {
            Error::io("bind")(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                return Err(bind_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; refusing to replace it",
                )));
            }
            _ => {}
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let fd = seqpacket_socket()?;
        let addr = UnixAddr::new(&tmp).map_err(|e| bind_err(e.into()))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| bind_err(e.into()))?;
        let publish = || -> io::Result<u64> {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            listen(&fd, Backlog::new(128).map_err(io::Error::from)?).map_err(io::Error::from)?;
            std::fs::rename(&tmp, path)?;
            Ok(std::fs::symlink_metadata(path)?.ino())
        };
        let inode = publish().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            bind_err(e)
        })?;
        Ok(SeqpacketListener {
            fd: register(fd)?,
            path: path.to_owned(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the next connection.
    pub async fn accept(&self) -> Result<SeqpacketConn, Error> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |sock| {
                accept4(
                    sock.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            })
            .await
            .map_err(Error::io("accept"))?;
        // SAFETY: accept4 returned a new descriptor that only we hold.
        SeqpacketConn::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for SeqpacketListener {
    fn drop(&mut self) {
        // A newer agent may have bound its own socket at this path: leave that alone.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Netns;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn a_passed_fd_is_the_same_netns_on_the_other_side() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let netns = Netns::current().unwrap();
        a.send(b"hi", Some(netns.as_fd())).await.unwrap();
        let got = b.recv().await.unwrap();
        assert_eq!(got.bytes, b"hi");
        let received = Netns::from_fd(got.fd.unwrap()).unwrap();
        assert_eq!(received.id(), netns.id());
    }

    #[tokio::test]
    async fn oversized_datagram_is_reported_truncated() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        a.send(&vec![7u8; MAX_DATAGRAM + 1], None).await.unwrap();
        assert!(matches!(b.recv().await, Err(Error::Truncated { .. })));
        // The connection stays usable: boundaries are kept.
        a.send(b"next", None).await.unwrap();
        assert_eq!(b.recv().await.unwrap().bytes, b"next");
    }

    fn send_raw_fds(conn: &SeqpacketConn, n: usize) {
        let files: Vec<std::fs::File> = (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(b"x")];
        sendmsg::<()>(
            conn.fd.get_ref().as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[tokio::test]
    async fn extra_fds_are_refused_and_closed() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let before = open_fds();
        send_raw_fds(&a, 2);
        assert!(matches!(
            b.recv().await,
            Err(Error::TooManyFds { count: 2 })
        ));
        send_raw_fds(&a, 200);
        assert!(matches!(
            b.recv().await,
            Err(Error::TooManyFds { count: 200 })
        ));
        assert_eq!(open_fds(), before, "received fds leaked");
    }

    #[tokio::test]
    async fn closed_peer_and_silence_are_distinct_errors() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let err = b.recv_timeout(Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { op: "recv", .. }));
        drop(a);
        assert!(matches!(b.recv().await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn listener_replaces_stale_socket_and_is_not_world_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let first = SeqpacketListener::bind(&path, 0o600).unwrap();
        std::mem::forget(first); // simulate a crash: the socket file stays behind
        let listener = SeqpacketListener::bind(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let client = SeqpacketConn::connect(&path).await.unwrap();
        let server = listener.accept().await.unwrap();
        client.send(b"\x08\x01", None).await.unwrap();
        assert_eq!(server.recv().await.unwrap().bytes, b"\x08\x01");
        let cred = server.peer_credentials().unwrap();
        assert_eq!(cred.pid(), std::process::id() as i32);
        // The peer's pidfd names the same process (its fdinfo says which).
        let pidfd = server.peer_pidfd().unwrap();
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        assert!(
            info.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["Pid:", &std::process::id().to_string()]),
            "{info}"
        );
        drop(listener);
        assert!(!path.exists(), "listener left its socket behind");
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        std::fs::write(&path, "precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        assert!(SeqpacketListener::bind(&path, 0o600).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
