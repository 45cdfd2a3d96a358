//! A handle on a Linux network namespace: an open nsfs fd plus its identity.
//!
//! A socket belongs to the netns of the thread that created it, forever. To make a
//! socket in a pod's netns a thread must `setns(2)` into it first; [`Netns::run`] does
//! that on a fresh thread it owns, so no caller's thread (least of all a tokio worker)
//! is ever left in a foreign namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::fstatfs;

/// `ioctl(fd, NS_GET_NSTYPE)` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Whether traffic from or to `addr` can reach another workload: not loopback, not
/// link-local, not multicast or unspecified. A pod holding such an address in a family
/// that is not redirected would have uncaptured traffic.
pub fn routable(addr: &std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(v4) => {
            !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified() && !v4.is_multicast()
        }
        std::net::IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                // fe80::/10
                && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// Identity of a network namespace: two handles with the same id are the same netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub inode: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.inode)
    }
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
}

impl Netns {
    /// Opens the netns at `path` (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`, …).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        Self::from_fd(OwnedFd::from(file))
    }

    /// The netns of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Takes ownership of `fd` after checking that it really is a network namespace.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let fs = fstatfs(&fd).map_err(io::Error::from)?;
        if fs.filesystem_type().0 != libc::NSFS_MAGIC as _ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fd is not a namespace file (nsfs)",
            ));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which is
        // valid for the whole call because we own it.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind < 0 {
            return Err(io::Error::last_os_error());
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fd is a namespace, but not a network namespace",
            ));
        }
        Self::identified(fd)
    }

    /// `fd` with its identity (device and inode).
    fn identified(fd: OwnedFd) -> io::Result<Netns> {
        let meta = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
        Ok(Netns {
            fd,
            id: NetnsId {
                dev: meta.st_dev,
                inode: meta.st_ino,
            },
        })
    }

    /// A stand-in with an identity of its own and no namespace behind it (an unbound
    /// Unix socket: its inode is unique while it is open), for unit tests of code that
    /// only holds, compares and passes network namespaces. Entering it, or running
    /// anything inside it, fails. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn stand_in() -> io::Result<Netns> {
        Self::identified(OwnedFd::from(std::os::unix::net::UnixDatagram::unbound()?))
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn try_clone(&self) -> io::Result<Netns> {
        Ok(Netns {
            fd: self.fd.try_clone()?,
            id: self.id,
        })
    }

    /// Moves the *calling thread* into this netns. Only for threads the caller owns and
    /// dedicates to this namespace; prefer [`Netns::run`].
    pub fn enter(&self) -> io::Result<()> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }

    /// Runs `f` on a new thread inside this netns and returns its result. Sockets `f`
    /// creates belong to this netns; the caller's thread never changes namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The addresses on this netns's interfaces (read on a thread inside it).
    pub fn addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        self.run(|| -> io::Result<Vec<std::net::IpAddr>> {
            let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
            Ok(addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| std::net::IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
                })
                .collect())
        })?
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_netns_is_recognised_and_stable() {
        let a = Netns::current().unwrap();
        let b = Netns::current().unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.try_clone().unwrap().id(), a.id());
    }

    #[test]
    fn routable_addresses() {
        for (a, want) in [
            ("10.0.0.1", true),
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("fd00::1", true),
            ("2001:db8::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
        ] {
            assert_eq!(routable(&a.parse().unwrap()), want, "{a}");
        }
    }

    #[test]
    fn the_current_netns_has_its_loopback_address() {
        let addrs = Netns::current().unwrap().addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let file = File::open("/proc/self/status").unwrap();
        let err = Netns::from_fd(OwnedFd::from(file)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn another_namespace_type_is_not_a_netns() {
        let err = Netns::open(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(err.to_string().contains("not a network namespace"), "{err}");
    }
}
