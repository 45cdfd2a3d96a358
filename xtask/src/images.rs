//! Container images, from one definition ([`OURS`], [`CLUSTER`]) and without a
//! container engine or registry: each image is assembled as an OCI image layout by
//! umoci (Debian's package), from a base layer and a layer holding its program, and
//! exported as one OCI archive that `ctr images import` (containerd) and
//! `skopeo copy oci-archive:` read, every image named in it.
//!
//! - `cargo xtask images [--hub <hub>] [--tag <tag>]`: our two images (release builds),
//!   into `target/images/<tag>/images.tar`.
//! - `docker/Dockerfile` is rendered from [`OURS`] ([`dockerfile`]; a test holds the
//!   file to the rendering, `UPDATE_GOLDEN=1` rewrites it), for those with an engine.
//!
//! Bases, built from Debian root filesystems that `cargo xtask setup` assembles with
//! debootstrap (see `tools.rs`):
//! - [`Base::Cc`], glibc, libgcc and the CA bundle, the files of those Debian
//!   packages and nothing else (what Google's distroless `cc` image holds);
//! - [`Base::Debian`], a Debian root (minbase) with the packages named;
//! - [`Base::Scratch`], nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::Problem;
use crate::tools::{self, ran};

/// The charts' default hub.
pub const DEFAULT_HUB: &str = "localhost/ambient-inpod";
/// Where the images of Istio's components built here are named.
pub const ISTIO_HUB: &str = "localhost/istio";
/// Kubernetes' own (pause, kube-proxy, CoreDNS).
pub const K8S_HUB: &str = "localhost/k8s";
/// The sample applications'.
pub const APPS_HUB: &str = "localhost/apps";
/// The shell `PATH` every image gets.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an image starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// glibc, libgcc and CA certificates (`gcr.io/distroless/cc-debian12` in the
    /// Dockerfile).
    Cc,
    /// A Debian root filesystem (`tools::rootfs` name) with these packages.
    Debian {
        rootfs: &'static str,
        packages: &'static str,
    },
}

/// The agent image's packages (its programs: iptables and ip6tables, legacy and nft,
/// ipset, ip and ss, conntrack; its Kubernetes client loads the system's CAs).
pub const AGENT_BASE: Base = Base::Debian {
    rootfs: "agent-rootfs",
    packages: tools::AGENT_PACKAGES,
};
/// The sample client's: a shell, sleep and curl.
pub const APPS_BASE: Base = Base::Debian {
    rootfs: "apps-rootfs",
    packages: tools::APPS_PACKAGES,
};

/// One image: its name, base, program and how it runs.
#[derive(Clone, Copy, Debug)]
pub struct ImageDef {
    /// The name in its reference, `<hub>/<name>:<tag>`, and its Dockerfile stage.
    pub name: &'static str,
    pub base: Base,
    /// The program (a file of that name from the build) and where it goes; `None`
    /// for an image of its base alone.
    pub program: Option<(&'static str, &'static str)>,
    /// More files from the build beside the program (name, path in the image).
    pub also: &'static [(&'static str, &'static str)],
    /// Whether the program is the entrypoint (else the pod names its command).
    pub entrypoint: bool,
    pub user: &'static str,
    pub workdir: &'static str,
    /// Why it is built so: a comment in the Dockerfile.
    #[cfg_attr(not(test), allow(dead_code))]
    pub why: &'static str,
}

/// Our two images: ztunnel and the agent (`istio-cni`).
pub const OURS: [ImageDef; 2] = [
    ImageDef {
        name: "ztunnel",
        base: Base::Cc,
        program: Some(("ztunnel", "/usr/local/bin/ztunnel")),
        also: &[],
        entrypoint: true,
        user: "0",
        workdir: "/",
        why: "ztunnel calls no other program: glibc and CA certificates are all it needs.\n\
              Istio's default paths (./var/run/secrets/...) are relative to /.",
    },
    ImageDef {
        name: "istio-cni",
        base: AGENT_BASE,
        program: Some(("istio-cni", "/usr/local/bin/istio-cni")),
        also: &[],
        entrypoint: true,
        user: "0",
        workdir: "/",
        why: "The agent runs iptables and ip6tables (legacy and nft: it uses the node's), ipset,\n\
              ip and ss, and conntrack, inside pods' network namespaces; its Kubernetes client\n\
              loads the system's CA certificates. The agent binary is static: it is also the\n\
              CNI plugin, which the runtime runs on the node's own C library.",
    },
];

/// The images of a cluster built on this machine besides ours (`cargo xtask
/// cluster-e2e`): Kubernetes' pause, kube-proxy and CoreDNS, Istio's istiod
/// (`pilot`) and node agent (`install-cni`, for the migration from Istio's own), and
/// the sample applications.
pub const CLUSTER: [ImageDef; 7] = [
    ImageDef {
        name: "pause",
        base: Base::Scratch,
        program: Some(("pause", "/pause")),
        also: &[],
        entrypoint: true,
        user: "65535:65535",
        workdir: "/",
        why: "",
    },
    ImageDef {
        name: "kube-proxy",
        base: AGENT_BASE,
        program: Some(("kube-proxy", "/usr/local/bin/kube-proxy")),
        also: &[],
        entrypoint: false,
        user: "0",
        workdir: "/",
        why: "",
    },
    ImageDef {
        name: "coredns",
        base: Base::Cc,
        program: Some(("coredns", "/coredns")),
        also: &[],
        entrypoint: true,
        user: "0",
        workdir: "/",
        why: "",
    },
    ImageDef {
        name: "pilot",
        base: Base::Cc,
        program: Some(("pilot-discovery", "/usr/local/bin/pilot-discovery")),
        also: &[],
        entrypoint: true,
        user: "1337:1337",
        workdir: "/",
        why: "",
    },
    // As Istio's Dockerfile lays it out: the agent on the PATH, the plugin where the
    // agent copies it from; on the agent's base, which has the iptables programs it
    // runs.
    ImageDef {
        name: "install-cni",
        base: AGENT_BASE,
        program: Some(("install-cni", "/usr/local/bin/install-cni")),
        also: &[("istio-cni", "/opt/cni/bin/istio-cni")],
        entrypoint: true,
        user: "0",
        workdir: "/opt/cni/bin",
        why: "",
    },
    ImageDef {
        name: "curl",
        base: APPS_BASE,
        program: None,
        also: &[],
        entrypoint: false,
        user: "0",
        workdir: "/",
        why: "",
    },
    ImageDef {
        name: "go-httpbin",
        base: Base::Cc,
        program: Some(("go-httpbin", "/bin/go-httpbin")),
        also: &[],
        entrypoint: true,
        user: "65532:65532",
        workdir: "/",
        why: "",
    },
];

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub hub: String,
    pub tag: String,
}

/// The value after flag `name` on a command line (not empty, not another flag).
pub fn flag_value<'a>(
    it: &mut impl Iterator<Item = &'a String>,
    name: &str,
) -> Result<String, String> {
    it.next()
        .filter(|v| !v.is_empty() && !v.starts_with("--"))
        .cloned()
        .ok_or_else(|| format!("{name} needs a value"))
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hub: DEFAULT_HUB.into(),
            tag: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--hub" => opts.hub = flag_value(&mut it, a)?,
                "--tag" => opts.tag = flag_value(&mut it, a)?,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }

    /// `<hub>/<image>:<tag>`.
    pub fn reference(&self, image: &str) -> String {
        format!("{}/{image}:{}", self.hub, self.tag)
    }
}

/// `docker/Dockerfile`, rendered from [`OURS`] (a test holds the file to it).
#[cfg(test)]
fn dockerfile() -> String {
    let mut out = String::from(
        "# syntax=docker/dockerfile:1
#
# Rendered from xtask/src/images.rs (the one definition of the images, which `cargo
# xtask images` builds without an engine); do not edit: `UPDATE_GOLDEN=1 cargo test -p
# xtask` rewrites it. Both images from one build of the workspace:
#   docker build --target ztunnel   -t <hub>/ztunnel:<tag>   -f docker/Dockerfile .
#   docker build --target istio-cni -t <hub>/istio-cni:<tag> -f docker/Dockerfile .
# Both binaries come from the same workspace and commit, so they carry one version.

",
    );
    out.push_str(&format!("ARG DEBIAN={}\n\n", tools::DEBIAN));
    out.push_str(
        "FROM rust:1-${DEBIAN} AS build
WORKDIR /src
COPY . .
# The agent's binary is also the CNI plugin, which the runtime runs on the node, on
# the node's C library: it is linked statically (as `cargo xtask dist` does).
RUN --mount=type=cache,target=/usr/local/cargo/registry \\
    --mount=type=cache,target=/src/target \\
    triple=\"$(rustc -vV | sed -n 's/^host: //p')\" \\
 && cargo build --release --locked -p ztunnel --bins \\
 && RUSTFLAGS=\"-C target-feature=+crt-static\" \\
    cargo build --release --locked -p istio-cni --bins --target \"$triple\" \\
 && mkdir -p /out \\
 && cp target/release/ztunnel \"target/$triple/release/istio-cni\" /out/
",
    );
    for image in OURS {
        out.push('\n');
        for line in image.why.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        match image.base {
            Base::Scratch => out.push_str(&format!("FROM scratch AS {}\n", image.name)),
            Base::Cc => out.push_str(&format!(
                "FROM gcr.io/distroless/cc-debian12:nonroot AS {}\n",
                image.name
            )),
            Base::Debian { packages, .. } => {
                out.push_str(&format!("FROM debian:${{DEBIAN}}-slim AS {}\n", image.name));
                out.push_str(&format!("ARG PACKAGES=\"{packages}\"\n"));
                out.push_str(
                    "RUN apt-get update \\\n \
                     && apt-get install -y --no-install-recommends ${PACKAGES} \\\n \
                     && rm -rf /var/lib/apt/lists/*\n",
                );
            }
        }
        for (file, path) in image.program.iter().chain(image.also) {
            out.push_str(&format!("COPY --from=build /out/{file} {path}\n"));
        }
        out.push_str(&format!("WORKDIR {}\nUSER {}\n", image.workdir, image.user));
        if let (true, Some((_, path))) = (image.entrypoint, image.program) {
            out.push_str(&format!("ENTRYPOINT [\"{path}\"]\n"));
        }
    }
    out
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Problem + '_ {
    move |e| Problem(format!("{}: {e}", path.display()))
}

/// An OCI image layout that umoci writes.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    fn umoci(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("umoci");
        cmd.args(args);
        cmd
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// A new, empty layout at `dir` (whatever was there is removed).
    pub fn create(dir: &Path) -> Result<Layout, Problem> {
        let _ = std::fs::remove_dir_all(dir);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let layout = Layout {
            dir: dir.to_path_buf(),
        };
        let mut init = layout.umoci(&["init", "--layout"]);
        init.arg(dir);
        ran(&mut init, "umoci init")?;
        Ok(layout)
    }

    /// Tag `tag`: an image whose one layer is `layer` (an uncompressed tar).
    fn base(&self, tag: &str, layer: Option<&Path>) -> Result<(), Problem> {
        ran(
            &mut self.umoci(&["new", "--image", &self.image(tag)]),
            "umoci new",
        )?;
        if let Some(layer) = layer {
            let mut add = self.umoci(&["raw", "add-layer", "--image", &self.image(tag)]);
            add.arg(layer);
            ran(&mut add, "umoci raw add-layer")?;
        }
        Ok(())
    }

    /// Image `def` from base tag `base`, its program taken from `programs`.
    fn derive(&self, base: &str, def: &ImageDef, programs: &Path) -> Result<(), Problem> {
        ran(
            &mut self.umoci(&["tag", "--image", &self.image(base), def.name]),
            "umoci tag",
        )?;
        let image = self.image(def.name);
        for (file, path) in def.program.iter().chain(def.also) {
            let mut insert = self.umoci(&["insert", "--image", &image]);
            insert.arg(programs.join(file)).arg(path);
            ran(
                &mut insert,
                &format!("adding {file} to the {} image", def.name),
            )?;
        }
        let mut config = self.umoci(&[
            "config",
            "--image",
            &image,
            "--config.env",
            PATH_ENV,
            "--config.user",
            def.user,
            "--config.workingdir",
            def.workdir,
        ]);
        if let (true, Some((_, path))) = (def.entrypoint, def.program) {
            config.args(["--config.entrypoint", path]);
        }
        ran(&mut config, &format!("configuring the {} image", def.name))?;
        Ok(())
    }

    /// Exports `images` (tag, reference) as one OCI archive at `out`, each named by
    /// its reference (containerd's name annotation) and nothing else in its index.
    fn export(&self, images: &[(&str, String)], out: &Path) -> Result<(), Problem> {
        let index_path = self.dir.join("index.json");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).map_err(io(&index_path))?)
                .map_err(|e| Problem(format!("{}: {e}", index_path.display())))?;
        let manifests: Vec<serde_json::Value> = images
            .iter()
            .map(|(tag, reference)| {
                let mut m = index["manifests"]
                    .as_array()
                    .and_then(|all| {
                        all.iter()
                            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == *tag)
                    })
                    .cloned()
                    .ok_or_else(|| Problem(format!("the layout has no image {tag}")))?;
                m["annotations"]["io.containerd.image.name"] = reference.clone().into();
                Ok(m)
            })
            .collect::<Result<_, Problem>>()?;
        let staging = out.with_extension("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let export = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
        std::fs::write(staging.join("index.json"), export.to_string()).map_err(io(&staging))?;
        std::fs::copy(self.dir.join("oci-layout"), staging.join("oci-layout"))
            .map_err(io(&staging))?;
        let mut tar = Command::new("tar");
        tar.arg("-cf")
            .arg(out)
            .arg("-C")
            .arg(&staging)
            .args(["index.json", "oci-layout", "-C"])
            .arg(&self.dir)
            .arg("blobs");
        ran(&mut tar, "writing the image archive")?;
        let _ = std::fs::remove_dir_all(&staging);
        Ok(())
    }

    fn gc(&self) -> Result<(), Problem> {
        let mut gc = self.umoci(&["gc", "--layout"]);
        gc.arg(&self.dir);
        ran(&mut gc, "umoci gc").map(|_| ())
    }
}

/// The files of Debian packages `packages` in `rootfs` (from dpkg's lists), as paths
/// relative to the root with symlinked directories resolved (merged /usr), so that a
/// tar of them lays the files where the packages put them.
pub fn package_files(rootfs: &Path, packages: &[&str]) -> Result<Vec<String>, Problem> {
    let info = rootfs.join("var/lib/dpkg/info");
    let mut out = Vec::new();
    for package in packages {
        let list = [format!("{package}:amd64.list"), format!("{package}.list")]
            .into_iter()
            .map(|n| info.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Problem(format!(
                    "{package} is not installed in {}",
                    rootfs.display()
                ))
            })?;
        for line in std::fs::read_to_string(&list).map_err(io(&list))?.lines() {
            let rel = line.trim_start_matches('/');
            if rel.is_empty() || rel == "." {
                continue;
            }
            let path = rootfs.join(rel);
            // Directories, and directories reached through a symlink (`/lib` in a
            // merged-/usr root), are not files of the package.
            if std::fs::symlink_metadata(&path).is_err() || path.is_dir() {
                continue;
            }
            // The parent, resolved inside the root (`lib` -> `usr/lib`); the entry
            // itself is kept as it is (a library's version symlink stays a symlink).
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let real_parent = std::fs::canonicalize(parent).map_err(io(parent))?;
            let real_root = std::fs::canonicalize(rootfs).map_err(io(rootfs))?;
            if let Ok(inside) = real_parent.strip_prefix(&real_root) {
                out.push(inside.join(name).to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The `cc` base layer: glibc and libgcc from `rootfs`, the merged-/usr symlinks,
/// the CA bundle, and the users the images run as.
fn cc_layer(rootfs: &Path, work: &Path) -> Result<PathBuf, Problem> {
    let mut files = package_files(rootfs, &["libc6", "libgcc-s1"])?;
    for link in ["bin", "sbin", "lib", "lib64"] {
        if rootfs.join(link).is_symlink() {
            files.push(link.to_string());
        }
    }
    files.push("etc/ssl/certs/ca-certificates.crt".into());
    let extra = work.join("cc-extra");
    let _ = std::fs::remove_dir_all(&extra);
    for d in ["etc", "tmp"] {
        std::fs::create_dir_all(extra.join(d)).map_err(io(&extra))?;
    }
    std::fs::write(
        extra.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nistio-proxy:x:1337:1337::/nonexistent:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n",
    )
    .map_err(io(&extra))?;
    std::fs::write(
        extra.join("etc/group"),
        "root:x:0:\nistio-proxy:x:1337:\nnonroot:x:65532:\n",
    )
    .map_err(io(&extra))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(extra.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .map_err(io(&extra))?;
    }
    let list = work.join("cc-files");
    std::fs::write(&list, files.join("\n") + "\n").map_err(io(&list))?;
    let layer = work.join("cc.tar");
    let mut tar = Command::new("tar");
    tar.arg("-cf")
        .arg(&layer)
        .arg("-C")
        .arg(rootfs)
        .arg("--no-recursion")
        .arg("-T")
        .arg(&list)
        .arg("--recursion")
        .arg("-C")
        .arg(&extra)
        .args(["etc", "tmp"]);
    ran(&mut tar, "the cc base layer")?;
    Ok(layer)
}

/// A Debian base layer: the root filesystem less package caches, device nodes and
/// anything the suite put into it.
fn debian_layer(rootfs: &Path, name: &str, work: &Path) -> Result<PathBuf, Problem> {
    let layer = work.join(format!("{name}.tar"));
    let mut tar = Command::new("tar");
    tar.arg("-cf").arg(&layer).arg("-C").arg(rootfs).args([
        "--exclude=./var/cache/apt/archives/*.deb",
        "--exclude=./var/lib/apt/lists/*",
        "--exclude=./dev/*",
        "--exclude=./usr/local/bin/*",
        "--exclude=./.packages",
        ".",
    ]);
    ran(&mut tar, &format!("the {name} base layer"))?;
    Ok(layer)
}

fn base_tag(base: Base) -> String {
    match base {
        Base::Scratch => "base-scratch".into(),
        Base::Cc => "base-cc".into(),
        Base::Debian { rootfs, .. } => format!("base-{rootfs}"),
    }
}

/// Adds the bases `defs` need to `layout`.
fn add_bases(layout: &Layout, defs: &[ImageDef], work: &Path) -> Result<(), Problem> {
    let mut bases: Vec<Base> = defs.iter().map(|d| d.base).collect();
    bases.dedup();
    let mut done = Vec::new();
    for base in bases {
        let tag = base_tag(base);
        if done.contains(&tag) {
            continue;
        }
        let layer = match base {
            Base::Scratch => None,
            Base::Cc => Some(cc_layer(&tools::dir().join("agent-rootfs"), work)?),
            Base::Debian { rootfs, .. } => {
                Some(debian_layer(&tools::dir().join(rootfs), rootfs, work)?)
            }
        };
        layout.base(&tag, layer.as_deref())?;
        if let Some(l) = layer {
            let _ = std::fs::remove_file(l);
        }
        done.push(tag);
    }
    Ok(())
}

/// Builds `defs` into a new layout at `dir`, programs from `programs`; exports them to
/// `archive` under `reference(name)`.
pub fn assemble(
    dir: &Path,
    defs: &[ImageDef],
    programs: &Path,
    reference: impl Fn(&ImageDef) -> String,
    archive: &Path,
) -> Result<(), Problem> {
    let layout = Layout::create(dir)?;
    let work = dir.with_extension("work");
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    add_bases(&layout, defs, &work)?;
    for def in defs {
        layout.derive(&base_tag(def.base), def, programs)?;
    }
    let named: Vec<(&str, String)> = defs.iter().map(|d| (d.name, reference(d))).collect();
    layout.gc()?;
    layout.export(&named, archive)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// `cargo xtask images`: our two images, release builds, as one OCI archive.
pub fn build(
    target: &Path,
    opts: &Options,
    cargo: impl Fn() -> Command,
) -> anyhow::Result<PathBuf> {
    crate::setup::ensure(crate::setup::For::Images)?;
    tools::ensure_rootfs(&[AGENT_BASE])?;
    let mut zt = cargo();
    zt.args(["build", "--release", "--bins", "-p", "ztunnel"]);
    crate::run(zt)?;
    let agent = crate::dist::static_agent(target, cargo(), true)?;
    let out = target.join("images").join(&opts.tag);
    let programs = out.join("programs");
    std::fs::create_dir_all(&programs).map_err(io(&programs))?;
    std::fs::copy(target.join("release/ztunnel"), programs.join("ztunnel"))
        .map_err(io(&programs))?;
    std::fs::copy(&agent, programs.join("istio-cni")).map_err(io(&programs))?;
    let archive = out.join("images.tar");
    assemble(
        &out.join("layout"),
        &OURS,
        &programs,
        |d| opts.reference(d.name),
        &archive,
    )?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_default_to_the_charts_hub_and_this_version() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!(o.hub, DEFAULT_HUB);
        assert_eq!(
            o.reference("ztunnel"),
            format!("{DEFAULT_HUB}/ztunnel:{}", env!("CARGO_PKG_VERSION"))
        );
        let o = Options::parse(&args(&["--hub", "reg.example/mesh", "--tag", "dev"])).unwrap();
        assert_eq!(o.reference("istio-cni"), "reg.example/mesh/istio-cni:dev");
        assert!(Options::parse(&args(&["--hub"])).is_err());
        assert!(Options::parse(&args(&["--tag", "--hub"])).is_err());
        assert!(Options::parse(&args(&["--push"])).is_err());
    }

    /// The Dockerfile is the rendering of the definitions both builds share.
    #[test]
    fn the_dockerfile_is_rendered_from_the_image_definitions() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/Dockerfile");
        let want = dockerfile();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            have, want,
            "docker/Dockerfile differs from xtask's image definitions: UPDATE_GOLDEN=1 cargo test -p xtask rewrites it"
        );
        for image in OURS {
            assert!(
                want.contains(&format!(" AS {}\n", image.name)),
                "{}",
                image.name
            );
        }
        assert!(want.contains(&format!("ARG PACKAGES=\"{}\"", tools::AGENT_PACKAGES)));
    }

    #[test]
    fn package_files_resolve_merged_usr_and_keep_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::fs::write(r.join("usr/lib/x86_64-linux-gnu/libc.so.6"), "elf").unwrap();
        std::os::unix::fs::symlink("libc.so.6", r.join("usr/lib/x86_64-linux-gnu/libc.so"))
            .unwrap();
        std::fs::create_dir_all(r.join("var/lib/dpkg/info")).unwrap();
        std::fs::write(
            r.join("var/lib/dpkg/info/libc6:amd64.list"),
            "/.\n/lib\n/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu/libc.so.6\n/lib/x86_64-linux-gnu/libc.so\n/lib/gone\n",
        )
        .unwrap();
        let files = package_files(r, &["libc6"]).unwrap();
        assert_eq!(
            files,
            [
                "usr/lib/x86_64-linux-gnu/libc.so",
                "usr/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
        assert!(package_files(r, &["nothere"])
            .unwrap_err()
            .0
            .contains("nothere"));
    }
}
