//! The HBONE request headers ztunnel reads from a peer: the CONNECT `:authority`
//! (where to tunnel to) and `forwarded` (the client the peer tunnels for). Both come
//! from outside the process: parsing is total, returns an error or `None`, and never
//! panics or allocates beyond the input.

use std::net::{IpAddr, SocketAddr};

/// The target of a CONNECT: `ip:port`, with an IPv6 address in brackets. Host names
/// are refused: ztunnel tunnels to addresses only.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, String> {
    authority
        .parse::<SocketAddr>()
        .map_err(|_| format!("CONNECT authority {authority:?} is not ip:port"))
}

/// The `for` of the first element of a `forwarded` header (RFC 7239):
/// `for="10.0.0.1:40000"`, `for=10.0.0.1`, `for="[fd00::1]:40000"`. `None` for
/// anything else (an obfuscated identifier, `unknown`, garbage).
pub fn forwarded_for(header: &str) -> Option<SocketAddr> {
    let first = header.split(',').next()?;
    let value = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// The `forwarded` header value ztunnel sends for `client`.
pub fn forwarded_value(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn authorities_and_forwarded_values() {
        assert_eq!(
            parse_authority("10.0.0.1:8080"),
            Ok("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::1]:80"),
            Ok("[fd00::1]:80".parse().unwrap())
        );
        for bad in [
            "",
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:99999",
            "fd00::1:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad}");
        }
        let v6: SocketAddr = "[fd00::1]:4000".parse().unwrap();
        assert_eq!(forwarded_for(&forwarded_value(v6)), Some(v6));
        assert_eq!(
            forwarded_for("for=10.0.0.1;proto=https, for=10.0.0.2"),
            Some("10.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            forwarded_for("proto=http; For=\"[fd00::2]\""),
            Some("[fd00::2]:0".parse().unwrap())
        );
        for junk in [
            "",
            "for=unknown",
            "for=_hidden",
            "by=10.0.0.1",
            "for",
            "=",
            "for=\"",
        ] {
            assert_eq!(forwarded_for(junk), None, "{junk}");
        }
    }

    proptest! {
        #[test]
        fn prop_header_parsers_never_panic(s in "\\\\PC{0,200}") {
            let _ = parse_authority(&s);
            let _ = forwarded_for(&s);
        }

        #[test]
        fn prop_forwarded_round_trips(ip in any::<IpAddr>(), port in any::<u16>()) {
            let addr = SocketAddr::new(ip, port);
            prop_assert_eq!(forwarded_for(&forwarded_value(addr)), Some(addr));
            prop_assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
        }
    }
}
