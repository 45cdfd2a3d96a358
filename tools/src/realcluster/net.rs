//! The cluster's network: a switch (a bridge in a network namespace of its own, so
//! the host's netfilter never sees node-to-node traffic), the host's link to it
//! carrying the API server's address, and each node's namespace with its link, its
//! default route to the host and a route to every other node's pod range. Nothing is
//! forwarded or masqueraded out of the machine: the host does not route for the nodes.

use super::{ip, NodeSpec, Result, BRIDGE, HOST_IF, HOST_IP, NET_NS, NODE_PREFIX};

/// Creates the switch and the host's link to it.
pub fn switch_up() -> Result<()> {
    ip(&["netns", "add", NET_NS])?;
    ip(&["-n", NET_NS, "link", "set", "lo", "up"])?;
    ip(&["-n", NET_NS, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", NET_NS, "link", "set", BRIDGE, "up"])?;
    ip(&[
        "link", "add", HOST_IF, "type", "veth", "peer", "name", "host-up", "netns", NET_NS,
    ])?;
    ip(&[
        "-n", NET_NS, "link", "set", "host-up", "master", BRIDGE, "up",
    ])?;
    ip(&[
        "addr",
        "add",
        &format!("{HOST_IP}/{NODE_PREFIX}"),
        "dev",
        HOST_IF,
    ])?;
    ip(&["link", "set", HOST_IF, "up"])?;
    Ok(())
}

/// Creates `node`'s namespace and link; `others` are the other nodes, whose pod ranges
/// it routes to directly.
pub fn node_up(node: &NodeSpec, others: &[NodeSpec]) -> Result<()> {
    let ns = node.netns();
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        NET_NS,
        "link",
        "add",
        &node.uplink(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns,
    ])?;
    ip(&[
        "-n",
        NET_NS,
        "link",
        "set",
        &node.uplink(),
        "master",
        BRIDGE,
        "up",
    ])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{}/{NODE_PREFIX}", node.ip()),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &HOST_IP.to_string(),
    ])?;
    for other in others.iter().filter(|o| o.index != node.index) {
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &other.pod_cidr(),
            "via",
            &other.ip().to_string(),
        ])?;
    }
    // The host reaches pods (the API server calls admission webhooks at pod
    // addresses) through their node.
    ip(&[
        "route",
        "add",
        &node.pod_cidr(),
        "via",
        &node.ip().to_string(),
        "dev",
        HOST_IF,
    ])?;
    // A node forwards between its pods and the network, as every Kubernetes node does.
    sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// Sets a sysctl inside network namespace `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    super::run(
        &format!("sysctl {key}={value} in {ns}"),
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]),
    )
    .map(|_| ())
}
