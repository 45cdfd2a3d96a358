//! Running CNI plugins the way a container runtime does: one executable per plugin,
//! the config on stdin, the request in `CNI_*` variables, each chained plugin given
//! the previous one's result as `prevResult`; DEL in reverse order.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// Where plugins are looked up, in order: Debian's containernetworking-plugins
/// (`/usr/lib/cni`, or `$CNI_PATH`), then the workspace's binaries (our `istio-cni`).
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = match std::env::var_os("CNI_PATH") {
        Some(path) => std::env::split_paths(&path).collect(),
        None => vec![PathBuf::from("/usr/lib/cni")],
    };
    dirs.extend(
        crate::bin_path("istio-cni")
            .parent()
            .map(std::path::Path::to_path_buf),
    );
    dirs
}

/// One CNI invocation's parameters.
pub struct Invocation<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// `CNI_ARGS`, as kubelet sets them (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…`).
    pub args: &'a str,
    /// Directories hidden from the plugins (each an empty tmpfs in their mount
    /// namespace).
    pub hidden: &'a [PathBuf],
}

fn exec_plugin(command: &str, conf: &Value, inv: &Invocation<'_>) -> anyhow::Result<Value> {
    let kind = conf["type"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("plugin config without type: {conf}"))?;
    let dirs = plugin_dirs();
    let bin = dirs
        .iter()
        .map(|d| d.join(kind))
        .find(|b| b.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "CNI plugin {kind} not found in {dirs:?}: install containernetworking-plugins"
            )
        })?;
    let path = std::env::join_paths(&dirs)?;
    let mut cmd = Command::new(&bin);
    if !inv.hidden.is_empty() {
        // A private mount namespace in which each hidden directory is an empty tmpfs.
        cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg("for d in $E2E_HIDE; do mount -t tmpfs -o size=4k none \"$d\" || exit 97; done; exec \"$0\"")
            .arg(&bin)
            .env(
                "E2E_HIDE",
                inv.hidden
                    .iter()
                    .map(|p| p.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
    }
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", inv.args)
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "CNI {command} {kind} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&stdout)?)
}

/// Runs one plugin of `conflist` (the last, as our istio-cni is) alone with `ADD`, given
/// the result the plugins before it produced.
pub fn add_last(conflist: &Value, prev: &Value, inv: &Invocation<'_>) -> anyhow::Result<Value> {
    let last = plugins(conflist)?
        .last()
        .ok_or_else(|| anyhow::anyhow!("empty conflist"))?;
    exec_plugin("ADD", &plugin_conf(conflist, last, prev), inv)
}

/// Runs ADD through the conflist's plugins; returns the final result.
pub fn add(conflist: &Value, inv: &Invocation<'_>) -> anyhow::Result<Value> {
    let mut prev = Value::Null;
    for plugin in plugins(conflist)? {
        let conf = plugin_conf(conflist, plugin, &prev);
        prev = exec_plugin("ADD", &conf, inv)?;
    }
    Ok(prev)
}

/// Runs DEL through the conflist's plugins in reverse order, attempting all of them.
pub fn del(conflist: &Value, inv: &Invocation<'_>) -> anyhow::Result<()> {
    let mut first_err = None;
    for plugin in plugins(conflist)?.iter().rev() {
        let conf = plugin_conf(conflist, plugin, &Value::Null);
        if let Err(e) = exec_plugin("DEL", &conf, inv) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn plugins(conflist: &Value) -> anyhow::Result<&Vec<Value>> {
    conflist["plugins"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("conflist without plugins"))
}

fn plugin_conf(conflist: &Value, plugin: &Value, prev: &Value) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    if !prev.is_null() {
        conf["prevResult"] = prev.clone();
    }
    conf
}

/// The first IP address of a CNI result (`ips[0].address`, CIDR form).
pub fn first_ip(result: &Value) -> anyhow::Result<IpAddr> {
    let cidr = result["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("CNI result without an IP: {result}"))?;
    let ip = cidr.split('/').next().unwrap_or(cidr);
    Ok(ip.parse()?)
}

/// Every address of a CNI result (`ips[].address`), in order.
pub fn all_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// A conflist for pods on one bridge: bridge + host-local, one address from each of
/// `subnets` (a range per family).
pub fn bridge_conflist(name: &str, bridge: &str, subnets: &[&str], ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{ "subnet": s }])).collect();
    let routes: Vec<Value> = subnets
        .iter()
        .map(|s| json!({ "dst": if s.contains(':') { "::/0" } else { "0.0.0.0/0" } }))
        .collect();
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                // A default route, as pods have: without one, connecting to a service
                // VIP fails in routing before the pod's nat rule can redirect it.
                "routes": routes,
                "dataDir": ipam_dir,
            }
        }]
    })
}

/// The loopback network: brings `lo` up (`ip netns add` leaves it down).
pub fn loopback_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "loopback",
        "plugins": [{ "type": "loopback" }]
    })
}
