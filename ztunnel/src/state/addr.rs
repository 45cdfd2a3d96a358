//! One form for each address. An IPv4 address can also be written as IPv6
//! (`::ffff:10.0.0.1`, "IPv4-mapped"); the kernel hands ztunnel the IPv4 form, so a
//! workload or CIDR kept in the mapped form would never match a connection: the
//! workload would be "unknown" (plaintext passthrough) and a DENY on the CIDR would
//! never apply. xDS input is made canonical here; the local file refuses the mapped
//! form, naming the address to write instead.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// `ip` in its canonical form (IPv4-mapped IPv6 as IPv4).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// `net` in its canonical form: a CIDR inside the IPv4-mapped range (`::ffff:0:0/96`
/// and longer prefixes) as the IPv4 CIDR it covers.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// Refuses an address written in the mapped form, naming the one to write.
pub fn refuse_mapped_ip(field: &str, ip: IpAddr) -> Result<IpAddr, String> {
    let canonical = canonical_ip(ip);
    if canonical == ip {
        Ok(ip)
    } else {
        Err(format!(
            "{field}: {ip} is an IPv4 address written as IPv6, which connections never carry: write {canonical}"
        ))
    }
}

/// Refuses a CIDR written in the mapped form, naming the one to write.
pub fn refuse_mapped_net(field: &str, net: IpNet) -> Result<IpNet, String> {
    let canonical = canonical_net(net);
    if canonical == net {
        Ok(net)
    } else {
        Err(format!(
            "{field}: {net} is an IPv4 range written as IPv6, which connections never carry: write {canonical}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_and_ranges_become_ipv4_and_others_stay() {
        let p = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(canonical_ip(p("::ffff:10.0.0.1")), p("10.0.0.1"));
        assert_eq!(canonical_ip(p("fd00::1")), p("fd00::1"));
        assert_eq!(canonical_ip(p("10.0.0.1")), p("10.0.0.1"));
        assert_eq!(canonical_net(n("::ffff:10.0.0.0/104")), n("10.0.0.0/8"));
        assert_eq!(canonical_net(n("::ffff:10.0.0.1/128")), n("10.0.0.1/32"));
        // Wider than the mapped range: not an IPv4 range, kept.
        assert_eq!(canonical_net(n("::ffff:0:0/80")), n("::ffff:0:0/80"));
        assert_eq!(canonical_net(n("fd00::/64")), n("fd00::/64"));
        let err = refuse_mapped_ip("workloadIps", p("::ffff:10.0.0.1")).unwrap_err();
        assert!(err.contains("write 10.0.0.1"), "{err}");
        let err = refuse_mapped_net("sourceIps", n("::ffff:10.0.0.0/104")).unwrap_err();
        assert!(err.contains("write 10.0.0.0/8"), "{err}");
        assert!(refuse_mapped_net("sourceIps", n("10.0.0.0/8")).is_ok());
    }
}
