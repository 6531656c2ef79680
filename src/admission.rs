//! Who may open a connection, decided from the handshake alone, pure: the client's real
//! address (X-Forwarded-For, only from a trusted proxy), the Origin check, the token, and the
//! client limits. A refusal carries the HTTP status, the text sent, and a reason for counters.

use std::net::IpAddr;

use sha1::{Digest, Sha1};

use crate::config::IpCidr;
use crate::ws::handshake::{Refusal, Upgrade};

/// Why a handshake was refused (a counter label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    Malformed,
    Origin,
    Token,
    ServerFull,
    PerIpLimit,
    TapFailed,
}

impl Refused {
    pub const ALL: [Refused; 6] = [
        Refused::Malformed,
        Refused::Origin,
        Refused::Token,
        Refused::ServerFull,
        Refused::PerIpLimit,
        Refused::TapFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Origin => "origin",
            Refused::Token => "token",
            Refused::ServerFull => "server_full",
            Refused::PerIpLimit => "per_ip_limit",
            Refused::TapFailed => "tap_failed",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Admission {
    pub max_clients: usize,
    pub max_per_ip: usize,
    pub trusted_proxies: Vec<IpCidr>,
    /// Empty: any origin.
    pub allowed_origins: Vec<String>,
    pub token: Option<String>,
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// right-most address of X-Forwarded-For that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpCidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(xff) = forwarded_for else { return peer };
    let mut client = peer;
    for hop in xff.rsplit(',').map(str::trim) {
        match parse_hop(hop) {
            Some(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            None => break, // garbage: stop at the last address we could read
        }
    }
    client
}

/// The client that trusted proxies name in X-Forwarded-For: walking from the right, the
/// first address that is not a trusted proxy (or the left-most). None if an entry on the way
/// cannot be read (`unknown`, empty): unlike [`client_ip`], which then settles for the last
/// address it could read, this is for decisions that must not fall back to the proxy's own.
pub fn forwarded_client(forwarded_for: &str, trusted: &[IpCidr]) -> Option<IpAddr> {
    let mut client = None;
    for hop in forwarded_for.rsplit(',').map(str::trim) {
        let ip = parse_hop(hop)?;
        client = Some(ip);
        if !trusted.iter().any(|c| c.contains(ip)) {
            break;
        }
    }
    client
}

/// One X-Forwarded-For entry: an address, or an address with a port (`203.0.113.9:51234`,
/// `[2001:db8::1]:443`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// An origin as browsers serialize it (`scheme://host[:port]`: lower case, no default
/// port, no path), or None if `s` is not one. A trailing `/` is allowed and dropped.
pub fn normalize_origin(s: &str) -> Option<String> {
    let s = s.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = s.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    // The port follows the last ':', unless that one is inside an IPv6 literal ([::1]).
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    // Browsers send ASCII hosts (IDNs in punycode) and ports as plain numbers.
    let canonical_port = |p: &str| p.parse::<u16>().is_ok_and(|n| n.to_string() == p);
    if host.is_empty() || !host.is_ascii() || port.is_some_and(|p| !canonical_port(p)) {
        return None;
    }
    Some(match (scheme, port) {
        ("https" | "wss", Some("443")) | ("http" | "ws", Some("80")) | (_, None) => format!("{scheme}://{host}"),
        (_, Some(p)) => format!("{scheme}://{host}:{p}"),
    })
}

/// What the per-address limits count `ip` as: an IPv4 address itself (also written as an
/// IPv4-mapped IPv6 one), an IPv6 address by its /64, which one host or home network gets and
/// in which it can pick a new address for every connection.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Compare secrets in time that depends on neither their contents nor their lengths.
fn same_secret(a: &str, b: &str) -> bool {
    let (x, y) = (Sha1::digest(a.as_bytes()), Sha1::digest(b.as_bytes()));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

/// The token a client presented: the first `?token=…` in the query, or the whole path `/…`.
/// Only the first: one request must not be able to try hundreds of guesses.
fn presented_tokens(target: &str) -> impl Iterator<Item = &str> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let from_query = query.split('&').find_map(|kv| kv.strip_prefix("token="));
    from_query.into_iter().chain(path.strip_prefix('/').filter(|p| !p.is_empty()))
}

impl Admission {
    /// Judge an upgrade from `ip` (already resolved with [`client_ip`]) when `clients` are
    /// connected in all and `from_ip` from that address.
    pub fn check(&self, up: &Upgrade, clients: usize, from_ip: usize) -> Result<(), (Refused, Refusal)> {
        if !self.allowed_origins.is_empty() {
            let ok = up.origin.as_deref().and_then(normalize_origin).is_some_and(|o| self.allowed_origins.contains(&o));
            if !ok {
                return Err((Refused::Origin, Refusal::new(403, "wsnic: this origin may not connect\n")));
            }
        }
        if let Some(token) = &self.token {
            // Check every candidate, so the time taken does not say which one was close.
            let ok = presented_tokens(&up.target).fold(false, |ok, t| same_secret(t, token) | ok);
            if !ok {
                let mut r = Refusal::new(401, "wsnic: a valid token is required (?token=...)\n");
                r.headers = "WWW-Authenticate: Bearer realm=\"wsnic\"\r\n";
                return Err((Refused::Token, r));
            }
        }
        if clients >= self.max_clients {
            let mut r = Refusal::new(503, "wsnic: server full, try again later\n");
            r.headers = "Retry-After: 30\r\n";
            return Err((Refused::ServerFull, r));
        }
        if from_ip >= self.max_per_ip {
            return Err((Refused::PerIpLimit, Refusal::new(429, "wsnic: too many connections from your address\n")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(target: &str, origin: Option<&str>) -> Upgrade {
        Upgrade {
            head_len: 0,
            target: target.into(),
            origin: origin.map(Into::into),
            forwarded_for: None,
            accept: String::new(),
            protocol: None,
        }
    }

    fn adm() -> Admission {
        Admission { max_clients: 10, max_per_ip: 2, ..Default::default() }
    }

    #[test]
    fn limits() {
        assert!(adm().check(&up("/", None), 9, 1).is_ok());
        assert_eq!(adm().check(&up("/", None), 10, 0).unwrap_err().1.status, 503);
        assert_eq!(adm().check(&up("/", None), 3, 2).unwrap_err().1.status, 429);
    }

    #[test]
    fn origins() {
        let a = Admission { allowed_origins: vec!["https://copy.sh".into()], ..adm() };
        assert!(a.check(&up("/", Some("https://copy.sh")), 0, 0).is_ok());
        assert!(a.check(&up("/", Some("https://copy.sh/")), 0, 0).is_ok());
        assert_eq!(a.check(&up("/", Some("https://evil.example")), 0, 0).unwrap_err().0, Refused::Origin);
        assert_eq!(a.check(&up("/", None), 0, 0).unwrap_err().1.status, 403);
    }

    #[test]
    fn tokens() {
        let a = Admission { token: Some("s3cret".into()), ..adm() };
        assert!(a.check(&up("/?token=s3cret", None), 0, 0).is_ok());
        assert!(a.check(&up("/?x=1&token=s3cret", None), 0, 0).is_ok());
        assert!(a.check(&up("/s3cret", None), 0, 0).is_ok());
        for bad in [
            "/",
            "/?token=",
            "/?token=s3cre",
            "/?token=s3cret2",
            "/S3CRET",
            "/s3cret/",
            "/x?token=nope",
            "/x?token=a&token=s3cret", // one guess per request
        ] {
            let (why, r) = a.check(&up(bad, None), 0, 0).unwrap_err();
            assert_eq!((why, r.status), (Refused::Token, 401), "{bad}");
        }
        // The token is checked before the limits: a full server does not reveal itself to strangers.
        assert_eq!(a.check(&up("/", None), 10, 5).unwrap_err().0, Refused::Token);
    }

    #[test]
    fn origins_as_browsers_send_them() {
        let n = |s: &str| normalize_origin(s);
        assert_eq!(n("https://copy.sh/").as_deref(), Some("https://copy.sh"));
        assert_eq!(n("https://Copy.SH:443").as_deref(), Some("https://copy.sh"));
        assert_eq!(n("http://x.org:80").as_deref(), Some("http://x.org"));
        assert_eq!(n("http://x.org:8080").as_deref(), Some("http://x.org:8080"));
        assert_eq!(n("http://[::1]:8000").as_deref(), Some("http://[::1]:8000"));
        assert_eq!(n("http://[::1]").as_deref(), Some("http://[::1]"));
        for bad in
            ["copy.sh", "https://", "https://copy.sh/path", "https://x:", "https://x:ab", "https://u@x", "1x://y"]
                .into_iter()
                .chain(["https://bücher.example", "https://x:0443", "https://x:70000"])
        {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn limits_count_ipv6_by_its_64() {
        let key = |s: &str| limit_key(s.parse().unwrap()).to_string();
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn a_forwarded_client_is_read_or_none() {
        let trusted: Vec<IpCidr> = vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let f = |xff: &str| forwarded_client(xff, &trusted).map(|ip| ip.to_string());
        assert_eq!(f("203.0.113.9").as_deref(), Some("203.0.113.9"));
        assert_eq!(f("203.0.113.9:51234, 10.1.1.1").as_deref(), Some("203.0.113.9"));
        assert_eq!(f("[2001:db8::1]:443").as_deref(), Some("2001:db8::1"));
        assert_eq!(f("127.0.0.1").as_deref(), Some("127.0.0.1"), "a client on a proxy's own host");
        assert_eq!(f("unknown"), None);
        assert_eq!(f("203.0.113.9, unknown"), None, "stops where it cannot read, not at the proxy");
        assert_eq!(f(""), None);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpCidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_ip(ip("203.0.113.9"), Some("1.2.3.4"), &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), Some("1.2.3.4"), &trusted), ip("1.2.3.4"));
        // A client cannot smuggle an address in front: the right-most untrusted hop counts.
        assert_eq!(client_ip(ip("10.0.0.1"), Some("6.6.6.6, 1.2.3.4, 10.0.0.2"), &trusted), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("10.0.0.1"), None, &trusted), ip("10.0.0.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), Some("garbage"), &trusted), ip("10.0.0.1"));
    }
}
