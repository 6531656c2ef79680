//! Configuration: built-in defaults, the `wsnic.conf` file format, command-line overrides and
//! validation. Pure: nothing here touches the network, so a bad value is reported (with
//! file:line:key) before any change is made.
//!
//! One table, [`KEYS`], lists every key with its default and a one-line explanation; the CLI
//! options, `--help` and the checks that keep `wsnic.conf.template` complete are derived
//! from it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

/// An IPv4 subnet in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    /// The first host address: the bridge's (gateway's) address.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or("expected an IPv4 subnet like 192.168.2.0/24")?;
        let addr: Ipv4Addr = a.trim().parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 =
            p.trim().parse().ok().filter(|p| *p <= 32).ok_or(format!("{p:?} is not a prefix length 0..32"))?;
        let net = Ipv4Net { addr, prefix };
        if net.network() != addr {
            return Err(format!("host bits are set; did you mean {}/{}?", net.network(), prefix));
        }
        Ok(net)
    }
}

/// An IPv4 or IPv6 network, `ADDR/PREFIX` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(n) & m == u128::from(a) & m
            }
            (IpAddr::V6(_), IpAddr::V4(a)) => self.contains(IpAddr::V6(a.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(a)) => a.to_ipv4_mapped().is_some_and(|a| self.contains(IpAddr::V4(a))),
        }
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for IpCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => {
                p.trim().parse().ok().filter(|p| *p <= max).ok_or(format!("{p:?} is not a prefix length 0..{max}"))?
            }
        };
        Ok(IpCidr { addr, prefix })
    }
}

/// `10mbit`, `500kbit`, `1gbit`, `64000` (bits per second; decimal units) → bytes per second.
pub fn parse_rate(v: &str) -> Result<u64, String> {
    let err = || format!("{v:?} is not a rate (e.g. 10mbit, 500kbit, 1gbit)");
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "bit" | "bps" => 1,
        "kbit" | "k" => 1_000,
        "mbit" | "m" => 1_000_000,
        "gbit" | "g" => 1_000_000_000,
        _ => return Err(err()),
    };
    let bytes = n.saturating_mul(mult) / 8;
    if bytes < 8_000 {
        return Err(format!("{v:?}: at least 64kbit"));
    }
    Ok(bytes)
}

fn parse_list<T: std::str::FromStr<Err = String>>(v: &str) -> Result<Vec<T>, String> {
    v.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect()
}

/// The running configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub ws_server_addr: IpAddr,
    pub ws_server_port: u16,
    /// Uplink interface; `None`: the interface of the default route.
    pub eth_iface: Option<String>,
    pub bridge_subnet: Ipv4Net,
    pub bridge_restrict_inbound: bool,
    pub bridge_name: String,
    pub tap_prefix: String,
    pub nat: bool,
    pub max_frame_size: usize,
    /// Open TAPs with IFF_VNET_HDR and TCP/UDP segmentation offload.
    pub tap_offload: bool,
    /// Open TAPs with IFF_NAPI; a busy client's TAP gets a kernel thread (threaded NAPI).
    pub tap_threads: bool,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Event loops (threads); 0: one per CPU (`auto`).
    pub workers: usize,
    /// TCP congestion control of the listeners, which their clients' sockets inherit
    /// (None: the host's `net.ipv4.tcp_congestion_control`).
    pub tcp_congestion: Option<String>,
    pub dhcp_gateway: Option<Ipv4Addr>,
    pub dhcp_domain_name: Option<String>,
    pub dhcp_domain_name_server: Vec<Ipv4Addr>,
    pub dhcp_lease_time: u32,
    pub disable_dhcp: bool,
    /// Narrows the dynamic pool (inclusive).
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Reserved addresses: MAC → IP.
    pub dhcp_host: Vec<([u8; 6], Ipv4Addr)>,
    pub dhcp_mtu: Option<u16>,
    pub dhcp_lease_file: Option<std::path::PathBuf>,
    pub dhcp_lease_grace: Duration,
    pub max_clients: usize,
    pub max_clients_per_ip: usize,
    pub trusted_proxies: Vec<IpCidr>,
    pub allowed_origins: Vec<String>,
    pub auth_token: Option<String>,
    pub anti_spoofing: bool,
    pub client_isolation: bool,
    pub egress_policy: bool,
    pub egress_allow: Vec<Ipv4Net>,
    pub egress_deny: Vec<Ipv4Net>,
    /// Bytes per second, per client and direction.
    pub rate_limit: Option<u64>,
    pub status_allow: Vec<IpCidr>,
    /// wss:// port (0: no TLS listener).
    pub wss_port: u16,
    pub wss_certificate: Option<std::path::PathBuf>,
    pub wss_private_key: Option<std::path::PathBuf>,
    /// Where each key was last set ("wsnic.conf:12", "--bridge-name"); for error messages.
    origins: HashMap<&'static str, String>,
    /// When each key was last set (a count of `set_from` calls): which of two conflicting keys
    /// came later.
    set_order: HashMap<&'static str, usize>,
}

/// Keys whose change needs a restart (the network, the listener, DHCP, the firewall table);
/// the others take effect on SIGHUP.
pub const RESTART_KEYS: &[&str] = &[
    "ws_server_addr",
    "ws_server_port",
    "wss_port",
    "eth_iface",
    "bridge_subnet",
    "bridge_restrict_inbound",
    "bridge_name",
    "tap_prefix",
    "nat",
    "max_frame_size",
    "tap_offload",
    "tap_threads",
    "client_isolation",
    "egress_policy",
    "egress_allow",
    "egress_deny",
    "disable_dhcp",
    "dhcp_gateway",
    "dhcp_domain_name",
    "dhcp_domain_name_server",
    "dhcp_lease_time",
    "dhcp_range",
    "dhcp_host",
    "dhcp_mtu",
    "dhcp_lease_file",
    "dhcp_lease_grace",
    "workers",
    "tcp_congestion",
];

/// The entries of [`Config::summary`] made only of keys a reload applies.
const SUMMARY_RELOADED: [&str; 4] = ["max_clients", "auth", "anti_spoofing", "rate_limit"];

/// One configuration key: its name, default (as written in the file) and meaning.
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every key, in the order of `wsnic.conf.template`.
pub const KEYS: &[Key] = &[
    Key {
        name: "ws_server_addr",
        default: "127.0.0.1",
        help: "address the WebSocket server listens on (0.0.0.0 or :: for all interfaces)",
    },
    Key { name: "ws_server_port", default: "8070", help: "TCP port of the WebSocket server" },
    Key {
        name: "eth_iface",
        default: "",
        help: "uplink interface that the subnet is NAT-ed to (empty: the interface of the default route)",
    },
    Key {
        name: "bridge_subnet",
        default: "192.168.2.0/24",
        help: "subnet of the bridge; its first host address is the bridge's (gateway) address; /30 or larger",
    },
    Key {
        name: "bridge_restrict_inbound",
        default: "true",
        help: "true: only established/related traffic passes from the uplink to the bridge",
    },
    Key {
        name: "bridge_name",
        default: "wsnicbr0",
        help: "name of the bridge that wsnic creates (or adopts, if it already exists)",
    },
    Key {
        name: "tap_prefix",
        default: "wsnic",
        help: "name prefix of the per-client TAP devices (wsnic0, wsnic1, ...)",
    },
    Key { name: "nat", default: "true", help: "masquerade the subnet to the uplink (false: route it yourself)" },
    Key {
        name: "max_frame_size",
        default: "65549",
        help:
            "largest Ethernet frame (bytes, without FCS) a client may send or receive, 1514..65549; larger: close 1009",
    },
    Key {
        name: "tap_offload",
        default: "false",
        help: "TAP offload: the kernel hands TCP/UDP super-frames to wsnic, which cuts them into real frames for the client and merges a client's TCP segments (fewer system calls)",
    },
    Key {
        name: "tap_threads",
        default: "true",
        help: "a busy client's TAP (1000 frames/s or more from the client) gets a kernel thread of its own (threaded NAPI): the kernel's work on its frames (bridge, firewall, NAT, merging TCP segments) runs beside the event loop instead of inside it",
    },
    Key { name: "ping_interval", default: "30s", help: "a client silent this long gets a WebSocket PING" },
    Key {
        name: "idle_timeout",
        default: "100s",
        help: "a client silent this long is disconnected (must exceed ping_interval)",
    },
    Key {
        name: "handshake_timeout",
        default: "30s",
        help: "a connection that has not completed its WebSocket handshake after this long is dropped",
    },
    Key {
        name: "workers",
        default: "1",
        help: "event loops (threads) sharing the port, 1..64, or auto (one per CPU); needs a restart",
    },
    Key {
        name: "tcp_congestion",
        default: "",
        help: "TCP congestion control of the clients' connections, e.g. cubic (empty: the host's net.ipv4.tcp_congestion_control); needs a restart",
    },
    Key { name: "dhcp_gateway", default: "", help: "router address handed out by DHCP (empty: the bridge's address)" },
    Key { name: "dhcp_domain_name", default: "", help: "domain name handed out by DHCP (empty: none)" },
    Key {
        name: "dhcp_domain_name_server",
        default: "8.8.8.8, 8.8.4.4",
        help: "DNS servers handed out by DHCP, comma-separated (empty: none)",
    },
    Key { name: "dhcp_lease_time", default: "86400", help: "DHCP lease time in seconds" },
    Key {
        name: "disable_dhcp",
        default: "false",
        help: "true: do not answer DHCP; requests pass to the bridge for an external server (e.g. dnsmasq)",
    },
    Key {
        name: "dhcp_range",
        default: "",
        help: "first and last address of the DHCP pool, e.g. 192.168.2.100-192.168.2.200 (empty: the whole subnet)",
    },
    Key {
        name: "dhcp_host",
        default: "",
        help: "reserved addresses, MAC,IP pairs separated by spaces or ';' (e.g. 02:00:00:00:00:10,192.168.2.10)",
    },
    Key { name: "dhcp_mtu", default: "", help: "interface MTU handed out by DHCP, 576..65535 (empty: none)" },
    Key {
        name: "dhcp_lease_file",
        default: "",
        help: "file that keeps DHCP leases across restarts, rewritten atomically at most once a second (empty: none)",
    },
    Key {
        name: "dhcp_lease_grace",
        default: "300s",
        help: "how long a disconnected client's address is kept for a reconnect with the same MAC",
    },
    Key {
        name: "max_clients",
        default: "256",
        help: "most clients at once, 1..1023 (a bridge's port limit); over it: 503",
    },
    Key { name: "max_clients_per_ip", default: "8", help: "most clients at once from one IP address (an IPv6 one counts by its /64); over it: 429" },
    Key {
        name: "trusted_proxies",
        default: "",
        help: "reverse proxies (CIDRs) whose X-Forwarded-For names the real client (empty: trust none)",
    },
    Key {
        name: "allowed_origins",
        default: "",
        help: "web origins allowed to connect, scheme://host[:port] as browsers send them, e.g. https://copy.sh (empty: any)",
    },
    Key {
        name: "auth_token",
        default: "",
        help: "a secret clients must give as ?token=SECRET or as the URL path /SECRET; letters, digits and - . _ ~ ! $ ' ( ) * + , ; = : @ (empty: none)",
    },
    Key {
        name: "anti_spoofing",
        default: "true",
        help: "lock each client to its first MAC and, once DHCP gave it one, its address",
    },
    Key {
        name: "client_isolation",
        default: "false",
        help: "true: clients reach the gateway but not each other (bridge port isolation)",
    },
    Key {
        name: "egress_policy",
        default: "true",
        help: "keep clients away from the host and from private, link-local, CGNAT and multicast ranges",
    },
    Key {
        name: "egress_allow",
        default: "",
        help: "IPv4 CIDRs clients may reach despite egress_policy (e.g. a LAN printer)",
    },
    Key { name: "egress_deny", default: "", help: "further IPv4 CIDRs clients may not reach" },
    Key {
        name: "rate_limit",
        default: "",
        help: "per client and direction, e.g. 10mbit (shaped, not policed; empty: none)",
    },
    Key {
        name: "status_allow",
        default: "127.0.0.0/8, ::1",
        help: "addresses (CIDRs) that may see the status page and /metrics, which show client addresses",
    },
    Key { name: "wss_port", default: "0", help: "TCP port of the wss:// (TLS) listener, on ws_server_addr (0: none)" },
    Key { name: "wss_certificate", default: "", help: "PEM certificate chain for wss:// (leaf first)" },
    Key { name: "wss_private_key", default: "", help: "PEM private key for wss://" },
];

/// A configuration error, located: `wsnic.conf:12: bridge_subnet: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// "FILE:LINE", "--option" or "defaults".
    pub origin: String,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: {}: {}", self.origin, k, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Default for Config {
    fn default() -> Config {
        let mut c = Config {
            ws_server_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ws_server_port: 0,
            eth_iface: None,
            bridge_subnet: Ipv4Net { addr: Ipv4Addr::UNSPECIFIED, prefix: 0 },
            bridge_restrict_inbound: false,
            bridge_name: String::new(),
            tap_prefix: String::new(),
            nat: false,
            max_frame_size: 0,
            tap_offload: false,
            tap_threads: true,
            ping_interval: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            handshake_timeout: Duration::ZERO,
            workers: 0,
            tcp_congestion: None,
            dhcp_gateway: None,
            dhcp_domain_name: None,
            dhcp_domain_name_server: Vec::new(),
            dhcp_lease_time: 0,
            disable_dhcp: false,
            dhcp_range: None,
            dhcp_host: Vec::new(),
            dhcp_mtu: None,
            dhcp_lease_file: None,
            dhcp_lease_grace: Duration::ZERO,
            max_clients: 0,
            max_clients_per_ip: 0,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            auth_token: None,
            anti_spoofing: false,
            client_isolation: false,
            egress_policy: false,
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            rate_limit: None,
            status_allow: Vec::new(),
            wss_port: 0,
            wss_certificate: None,
            wss_private_key: None,
            origins: HashMap::new(),
            set_order: HashMap::new(),
        };
        for k in KEYS {
            c.set(k.name, k.default).expect("built-in default is valid");
        }
        c.origins.clear();
        c.set_order.clear();
        c
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not a boolean (true or false)")),
    }
}

/// `30`, `30s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let err = || format!("{v:?} is not a duration (e.g. 30s, 500ms, 2m)");
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(err()),
    };
    if d.is_zero() {
        return Err(format!("{v:?}: must be greater than zero"));
    }
    Ok(d)
}

fn parse_num<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{v:?} is not {what}"))
}

fn opt(v: &str) -> Option<&str> {
    Some(v).filter(|v| !v.is_empty())
}

/// A Linux interface name: 1..15 bytes, no '/', whitespace or ':'.
fn check_ifname(v: &str, max: usize) -> Result<String, String> {
    if v.is_empty()
        || v.len() > max
        || v.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        || v == "."
        || v == ".."
    {
        return Err(format!("{v:?} is not a valid interface name (1..{max} characters, no '/', ':' or spaces)"));
    }
    Ok(v.to_string())
}

impl Config {
    /// Set `key` from its textual `value` (already trimmed). Err: why the value is wrong.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let v = value.trim();
        match key {
            "ws_server_addr" => self.ws_server_addr = parse_num(v, "an IP address")?,
            "ws_server_port" => self.ws_server_port = parse_num(v, "a port number (0: no ws:// listener)")?,
            "eth_iface" => self.eth_iface = opt(v).map(|v| check_ifname(v, 15)).transpose()?,
            "bridge_subnet" => {
                let net: Ipv4Net = v.parse()?;
                if net.prefix > 30 {
                    return Err(format!(
                        "{v} is too small: a /30 or larger is needed (network, bridge, at least one client, broadcast)"
                    ));
                }
                self.bridge_subnet = net;
            }
            "bridge_restrict_inbound" => self.bridge_restrict_inbound = parse_bool(v)?,
            "bridge_name" => self.bridge_name = check_ifname(v, 15)?,
            // The kernel appends the device number; leave room for up to 5 digits.
            "tap_prefix" => self.tap_prefix = check_ifname(v, 10)?,
            "nat" => self.nat = parse_bool(v)?,
            "max_frame_size" => {
                let n: usize = parse_num(v, "a number of bytes")?;
                if !(1514..=65549).contains(&n) {
                    return Err(format!("{n} is outside 1514..65549"));
                }
                self.max_frame_size = n;
            }
            "tap_offload" => self.tap_offload = parse_bool(v)?,
            "tap_threads" => self.tap_threads = parse_bool(v)?,
            "ping_interval" => self.ping_interval = parse_duration(v)?,
            "idle_timeout" => self.idle_timeout = parse_duration(v)?,
            "handshake_timeout" => self.handshake_timeout = parse_duration(v)?,
            "workers" => {
                self.workers = match v {
                    "auto" | "0" => 0,
                    _ => parse_num::<usize>(v, "a number of threads (1..64) or auto").and_then(|n| {
                        if n > 64 {
                            Err(format!("{n} is outside 1..64"))
                        } else {
                            Ok(n)
                        }
                    })?,
                }
            }
            "tcp_congestion" => {
                self.tcp_congestion = opt(v)
                    .map(|v| {
                        // The kernel's names: at most 15 bytes (TCP_CA_NAME_MAX with its NUL).
                        if v.len() <= 15 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                            Ok(v.to_string())
                        } else {
                            Err(format!("{v:?} is not a congestion control's name (such as cubic, reno or bbr)"))
                        }
                    })
                    .transpose()?
            }
            "dhcp_gateway" => self.dhcp_gateway = opt(v).map(|v| parse_num(v, "an IPv4 address")).transpose()?,
            "dhcp_domain_name" => self.dhcp_domain_name = opt(v).map(str::to_string),
            "dhcp_domain_name_server" => {
                self.dhcp_domain_name_server = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| parse_num(s, "an IPv4 address"))
                    .collect::<Result<_, _>>()?
            }
            "dhcp_lease_time" => {
                self.dhcp_lease_time = parse_num(v, "a number of seconds").and_then(|n: u32| {
                    if n < 10 {
                        Err("must be at least 10 seconds".into())
                    } else {
                        Ok(n)
                    }
                })?
            }
            "disable_dhcp" => self.disable_dhcp = parse_bool(v)?,
            "dhcp_range" => {
                self.dhcp_range = opt(v)
                    .map(|v| {
                        let (a, b) = v.split_once(['-', ',']).ok_or(format!("{v:?}: expected FIRST-LAST"))?;
                        let a: Ipv4Addr = parse_num(a.trim(), "an IPv4 address")?;
                        let b: Ipv4Addr = parse_num(b.trim(), "an IPv4 address")?;
                        if a > b {
                            return Err(format!("{a} comes after {b}"));
                        }
                        Ok((a, b))
                    })
                    .transpose()?
            }
            "dhcp_host" => {
                self.dhcp_host = v
                    .split([' ', ';', '\t'])
                    .filter(|s| !s.is_empty())
                    .map(|pair| {
                        let (m, ip) = pair.split_once(',').ok_or(format!("{pair:?}: expected MAC,IP"))?;
                        Ok((crate::sys::parse_mac(m)?, parse_num(ip, "an IPv4 address")?))
                    })
                    .collect::<Result<_, String>>()?
            }
            "dhcp_mtu" => {
                self.dhcp_mtu = opt(v)
                    .map(|v| {
                        parse_num::<u16>(v, "an MTU").and_then(|m| {
                            if m < 576 {
                                Err(format!("{m} is below 576"))
                            } else {
                                Ok(m)
                            }
                        })
                    })
                    .transpose()?
            }
            "dhcp_lease_file" => self.dhcp_lease_file = opt(v).map(std::path::PathBuf::from),
            "dhcp_lease_grace" => self.dhcp_lease_grace = parse_duration(v)?,
            "max_clients" => {
                self.max_clients = parse_num::<usize>(v, "a number").and_then(|n| {
                    if (1..=1023).contains(&n) {
                        Ok(n)
                    } else {
                        Err(format!("{n} is outside 1..1023 (a bridge has 1023 ports)"))
                    }
                })?
            }
            "max_clients_per_ip" => {
                self.max_clients_per_ip = parse_num::<usize>(v, "a number").and_then(|n| {
                    if n == 0 {
                        Err("must be at least 1".into())
                    } else {
                        Ok(n)
                    }
                })?
            }
            "trusted_proxies" => self.trusted_proxies = parse_list(v)?,
            "allowed_origins" => {
                self.allowed_origins = v
                    .split([',', ' '])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        crate::admission::normalize_origin(s).ok_or_else(|| {
                            format!("{s:?} is not an origin: scheme://host[:port], as a browser sends it (e.g. https://copy.sh)")
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            "auth_token" => {
                // What a browser sends unchanged in a URL's path and query (RFC 3986 unreserved
                // and sub-delimiters, ':' and '@'), less what ends a token there ('&', and '/',
                // '?', '#'): anything else it may percent-encode, and the token would never match.
                if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~!$'()*+,;=:@".contains(&b)) {
                    return Err(
                        "may contain only letters, digits and - . _ ~ ! $ ' ( ) * + , ; = : @ (a browser may encode \
                         anything else in a URL, and '&', '/', '?', '#' end the token)"
                            .into(),
                    );
                }
                self.auth_token = opt(v).map(str::to_string)
            }
            "anti_spoofing" => self.anti_spoofing = parse_bool(v)?,
            "client_isolation" => self.client_isolation = parse_bool(v)?,
            "egress_policy" => self.egress_policy = parse_bool(v)?,
            "egress_allow" => self.egress_allow = parse_list(v)?,
            "egress_deny" => self.egress_deny = parse_list(v)?,
            "rate_limit" => self.rate_limit = opt(v).map(parse_rate).transpose()?,
            "status_allow" => self.status_allow = parse_list(v)?,
            "wss_port" => self.wss_port = parse_num(v, "a port number")?,
            "wss_certificate" => self.wss_certificate = opt(v).map(std::path::PathBuf::from),
            "wss_private_key" => self.wss_private_key = opt(v).map(std::path::PathBuf::from),
            _ => return Err("unknown key".into()),
        }
        Ok(())
    }

    /// Set `key` and remember where it came from.
    pub fn set_from(&mut self, key: &str, value: &str, origin: String) -> Result<(), ConfigError> {
        self.set(key, value).map_err(|message| ConfigError {
            origin: origin.clone(),
            key: Some(key.to_string()),
            message,
        })?;
        if let Some(k) = KEYS.iter().find(|k| k.name == key) {
            self.origins.insert(k.name, origin);
            let n = self.set_order.values().max().copied().unwrap_or(0) + 1;
            self.set_order.insert(k.name, n);
        }
        Ok(())
    }

    /// Apply the text of a config file; `name` is how errors refer to it.
    pub fn apply_file_text(&mut self, name: &str, text: &str) -> Result<(), ConfigError> {
        for (i, raw) in text.lines().enumerate() {
            let origin = format!("{name}:{}", i + 1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(ConfigError { origin, key: None, message: format!("expected key=value, found {line:?}") });
            };
            self.set_from(k.trim(), v, origin)?;
        }
        Ok(())
    }

    /// Read and apply a config file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: name.clone(),
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        self.apply_file_text(&name, &text)
    }

    fn origin(&self, key: &str) -> String {
        self.origins.get(key).cloned().unwrap_or_else(|| "defaults".into())
    }

    /// An error about `key`'s value found outside this module (by asking the kernel),
    /// naming where the value was set.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        ConfigError { origin: self.origin(key), key: Some(key.into()), message }
    }

    /// Checks that involve more than one key; the error names the later-set key's origin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err =
            |key: &str, message: String| Err(ConfigError { origin: self.origin(key), key: Some(key.into()), message });
        if self.idle_timeout <= self.ping_interval {
            let when = |k: &str| self.set_order.get(k).copied().unwrap_or(0);
            let key = if when("idle_timeout") >= when("ping_interval") { "idle_timeout" } else { "ping_interval" };
            return err(
                key,
                format!(
                    "idle_timeout ({:?}) must be longer than ping_interval ({:?})",
                    self.idle_timeout, self.ping_interval
                ),
            );
        }
        if let Some(gw) = self.dhcp_gateway {
            if !self.bridge_subnet.contains(gw)
                || gw == self.bridge_subnet.network()
                || gw == self.bridge_subnet.broadcast()
            {
                return err(
                    "dhcp_gateway",
                    format!("{gw} is not a host address of bridge_subnet {}", self.bridge_subnet),
                );
            }
        }
        if self.wss_port != 0 && (self.wss_certificate.is_none() || self.wss_private_key.is_none()) {
            return err("wss_port", "wss:// needs wss_certificate and wss_private_key".into());
        }
        if self.ws_server_port == 0 && self.wss_port == 0 {
            return err("ws_server_port", "0 turns ws:// off, and wss_port is 0 too: nothing would listen".into());
        }
        if self.ws_server_port != 0 && self.ws_server_port == self.wss_port {
            return err("wss_port", "ws:// and wss:// need different ports".into());
        }
        let net = self.bridge_subnet;
        let is_host = |ip: Ipv4Addr| net.contains(ip) && ip != net.network() && ip != net.broadcast();
        if let Some((a, b)) = self.dhcp_range {
            if !is_host(a) || !is_host(b) {
                return err("dhcp_range", format!("{a}-{b} is not inside bridge_subnet {net}"));
            }
        }
        for (i, (mac, ip)) in self.dhcp_host.iter().enumerate() {
            if !is_host(*ip)
                || *ip == self.bridge_addr()
                || Some(*ip) == self.dhcp_gateway
                || self.dhcp_domain_name_server.contains(ip)
            {
                return err(
                    "dhcp_host",
                    format!("{ip} (for {}) is not a client address of {net}", crate::sys::format_mac(mac)),
                );
            }
            if self.dhcp_host[..i].iter().any(|(m, a)| m == mac || a == ip) {
                return err("dhcp_host", format!("{} or {ip} is reserved twice", crate::sys::format_mac(mac)));
            }
        }
        if !self.disable_dhcp {
            // The dynamic pool: the range (or the subnet's hosts) without the bridge's, the
            // gateway's, the DNS servers' and the reserved addresses. The DHCP server refuses to
            // start without one.
            let (first, last) = (u32::from(net.first_host()), u32::from(net.broadcast()) - 1);
            let (lo, hi) = self.dhcp_range.map_or((first, last), |(a, b)| (u32::from(a), u32::from(b)));
            let (lo, hi) = (lo.max(first), hi.min(last));
            let taken = |a: u32| {
                a == u32::from(self.bridge_addr())
                    || self.dhcp_gateway.is_some_and(|g| u32::from(g) == a)
                    || self.dhcp_host.iter().any(|(_, r)| u32::from(*r) == a)
                    || self.dhcp_domain_name_server.iter().any(|d| u32::from(*d) == a)
            };
            if !(lo..=hi).any(|a| !taken(a)) {
                let key = ["dhcp_range", "dhcp_host", "dhcp_gateway", "dhcp_domain_name_server"]
                    .into_iter()
                    .find(|k| self.origins.contains_key(k))
                    .unwrap_or("bridge_subnet");
                return err(key, format!("leaves no address of {net} for the DHCP pool"));
            }
        }
        if self.eth_iface.as_deref() == Some(self.bridge_name.as_str()) {
            return err("eth_iface", "the uplink cannot be the bridge itself".into());
        }
        if self.tap_prefix.starts_with(&self.bridge_name)
            || self.bridge_name.starts_with(&self.tap_prefix)
                && self.bridge_name[self.tap_prefix.len()..].bytes().all(|b| b.is_ascii_digit())
        {
            return err(
                "tap_prefix",
                format!("TAP names {}N would collide with the bridge name {}", self.tap_prefix, self.bridge_name),
            );
        }
        Ok(())
    }

    /// The value of `key`, for comparing two configurations (a reload names what changed).
    pub fn value_of(&self, key: &str) -> String {
        match key {
            "ws_server_addr" => format!("{:?}", self.ws_server_addr),
            "ws_server_port" => format!("{:?}", self.ws_server_port),
            "wss_port" => format!("{:?}", self.wss_port),
            "eth_iface" => format!("{:?}", self.eth_iface),
            "bridge_subnet" => format!("{:?}", self.bridge_subnet),
            "bridge_restrict_inbound" => format!("{:?}", self.bridge_restrict_inbound),
            "bridge_name" => format!("{:?}", self.bridge_name),
            "tap_prefix" => format!("{:?}", self.tap_prefix),
            "nat" => format!("{:?}", self.nat),
            "max_frame_size" => format!("{:?}", self.max_frame_size),
            "tap_offload" => format!("{:?}", self.tap_offload),
            "tap_threads" => format!("{:?}", self.tap_threads),
            "client_isolation" => format!("{:?}", self.client_isolation),
            "egress_policy" => format!("{:?}", self.egress_policy),
            "egress_allow" => format!("{:?}", self.egress_allow),
            "egress_deny" => format!("{:?}", self.egress_deny),
            "disable_dhcp" => format!("{:?}", self.disable_dhcp),
            "dhcp_gateway" => format!("{:?}", self.dhcp_gateway),
            "dhcp_domain_name" => format!("{:?}", self.dhcp_domain_name),
            "dhcp_domain_name_server" => format!("{:?}", self.dhcp_domain_name_server),
            "dhcp_lease_time" => format!("{:?}", self.dhcp_lease_time),
            "dhcp_range" => format!("{:?}", self.dhcp_range),
            "dhcp_host" => format!("{:?}", self.dhcp_host),
            "dhcp_mtu" => format!("{:?}", self.dhcp_mtu),
            "dhcp_lease_file" => format!("{:?}", self.dhcp_lease_file),
            "dhcp_lease_grace" => format!("{:?}", self.dhcp_lease_grace),
            "workers" => format!("{:?}", self.workers),
            "tcp_congestion" => format!("{:?}", self.tcp_congestion),
            _ => String::new(),
        }
    }

    /// A summary for the status page (no secrets).
    pub fn summary(&self, uplink: Option<&str>) -> Vec<(&'static str, String)> {
        let on = |b: bool| if b { "on" } else { "off" }.to_string();
        vec![
            ("listen", format!("{} ws:{} wss:{}", self.ws_server_addr, self.ws_server_port, self.wss_port)),
            ("bridge", format!("{} {}/{}", self.bridge_name, self.bridge_addr(), self.bridge_subnet.prefix)),
            ("uplink", uplink.unwrap_or("none").to_string()),
            ("nat", on(self.nat && uplink.is_some())),
            ("dhcp", if self.disable_dhcp { "off".into() } else { format!("on, lease {}s", self.dhcp_lease_time) }),
            ("max_clients", format!("{} ({} per address)", self.max_clients, self.max_clients_per_ip)),
            ("auth", on(self.auth_token.is_some() || !self.allowed_origins.is_empty())),
            ("anti_spoofing", on(self.anti_spoofing)),
            ("client_isolation", on(self.client_isolation)),
            ("egress_policy", on(self.egress_policy)),
            ("rate_limit", self.rate_limit.map_or("none".into(), |r| format!("{} kbit/s", r * 8 / 1000))),
            ("max_frame_size", self.max_frame_size.to_string()),
            ("tap_offload", on(self.tap_offload)),
            ("tap_threads", on(self.tap_threads)),
            ("workers", self.worker_count().to_string()),
            ("tcp_congestion", self.tcp_congestion.clone().unwrap_or_else(|| "the host's".into())),
        ]
    }

    /// The summary after a reload to `self` while `running` is in force: keys that need a
    /// restart show what still runs (a reload does not apply them), the others the new values.
    pub fn summary_after_reload(&self, running: &Config, uplink: Option<&str>) -> Vec<(&'static str, String)> {
        let new = self.summary(uplink);
        running
            .summary(uplink)
            .into_iter()
            .zip(new)
            .map(|(old, new)| if SUMMARY_RELOADED.contains(&old.0) { new } else { old })
            .collect()
    }

    /// Event loops to run: `workers`, or one per CPU (at most 64) for `auto`.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(64),
            n => n,
        }
    }

    /// The bridge's (gateway's) address.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        self.bridge_subnet.first_host()
    }

    /// Name of the nftables table this instance owns (one per bridge, so instances with
    /// different bridges never touch each other's rules). The bridge's name is encoded one to
    /// one, so that `br-0`, `br.0` and `br_0` get different tables: letters and digits stay,
    /// `_` becomes `__`, any other byte `_` and two hex digits (at most 51 characters).
    pub fn nft_table(&self) -> String {
        let mut t = String::from("wsnic_");
        for b in self.bridge_name.bytes() {
            match b {
                b'_' => t.push_str("__"),
                b if b.is_ascii_alphanumeric() => t.push(char::from(b)),
                b => t.push_str(&format!("_{b:02x}")),
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_original() {
        let c = Config::default();
        assert_eq!(c.ws_server_addr.to_string(), "127.0.0.1");
        assert_eq!(c.ws_server_port, 8070);
        assert_eq!(c.bridge_subnet.to_string(), "192.168.2.0/24");
        assert_eq!(c.bridge_addr(), Ipv4Addr::new(192, 168, 2, 1));
        assert!(c.bridge_restrict_inbound && c.nat);
        assert_eq!(c.dhcp_domain_name_server, vec![Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(8, 8, 4, 4)]);
        assert_eq!(c.dhcp_lease_time, 86400);
        assert_eq!(c.max_frame_size, 65549);
        assert_eq!(
            (c.ping_interval, c.idle_timeout, c.handshake_timeout),
            (Duration::from_secs(30), Duration::from_secs(100), Duration::from_secs(30))
        );
        assert_eq!(c.nft_table(), "wsnic_wsnicbr0");
        c.validate().unwrap();
    }

    #[test]
    fn every_bridge_gets_its_own_table() {
        let table = |name: &str| {
            let mut c = Config::default();
            c.set("bridge_name", name).unwrap();
            c.nft_table()
        };
        let names = ["br-0", "br.0", "br_0", "br__0", "br_2d0", "br0", "a-b_c", "a_b-c", "a_2db_c"];
        let tables: std::collections::HashSet<String> = names.iter().map(|n| table(n)).collect();
        assert_eq!(tables.len(), names.len(), "{tables:?}");
        assert_eq!(table("br-lan"), "wsnic_br_2dlan");
        assert_eq!(table("br_lan"), "wsnic_br__lan");
        assert!(table("---------------").len() <= 64);
    }

    #[test]
    fn original_template_is_accepted_unchanged() {
        let mut c = Config::default();
        c.apply_file_text("seed.conf", include_str!("../tests/data/original-wsnic.conf")).unwrap();
        assert_eq!(c.eth_iface.as_deref(), Some("eth0"));
        assert_eq!(c.dhcp_gateway, None);
        c.validate().unwrap();
    }

    /// A conflict between two keys names the one set later, where it was set.
    #[test]
    fn a_conflict_names_the_later_key() {
        let mut c = Config::default();
        c.apply_file_text("w.conf", "idle_timeout=40s\n").unwrap();
        c.set_from("ping_interval", "60s", "--ping-interval".into()).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("--ping-interval: ping_interval: idle_timeout (40s)"), "{e}");
        let mut c = Config::default();
        c.apply_file_text("w.conf", "ping_interval=60s\n").unwrap();
        c.set_from("idle_timeout", "40s", "--idle-timeout".into()).unwrap();
        assert!(c.validate().unwrap_err().to_string().starts_with("--idle-timeout: idle_timeout:"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let mut c = Config::default();
        let e = c.apply_file_text("w.conf", "# c\n\nbridge_subnet=192.168.2.0/31\n").unwrap_err();
        assert_eq!(e.to_string(), "w.conf:3: bridge_subnet: 192.168.2.0/31 is too small: a /30 or larger is needed (network, bridge, at least one client, broadcast)");
        let e = Config::default().apply_file_text("w.conf", "colour=blue\n").unwrap_err();
        assert_eq!(e.to_string(), "w.conf:1: colour: unknown key");
        let e = Config::default().apply_file_text("w.conf", "nat\n").unwrap_err();
        assert!(e.to_string().starts_with("w.conf:1: expected key=value"));
        for (line, frag) in [
            ("ws_server_port=80800", "not a port"),
            ("wss_port=x", "not a port"),
            ("bridge_subnet=192.168.2.1/24", "did you mean 192.168.2.0/24"),
            ("bridge_restrict_inbound=maybe", "not a boolean"),
            ("max_frame_size=70000", "outside"),
            ("ping_interval=10x", "not a duration"),
            ("dhcp_domain_name_server=8.8.8.8, nope", "not an IPv4"),
            ("bridge_name=a-very-long-bridge-name", "interface name"),
            ("dhcp_range=192.168.2.9-192.168.2.3", "comes after"),
            ("dhcp_host=02:00:00:00:00:01", "expected MAC,IP"),
            ("dhcp_host=01:00:00:00:00:01,192.168.2.5", "unicast"),
            ("dhcp_mtu=100", "below 576"),
            ("workers=65", "outside 1..64"),
            ("workers=many", "or auto"),
            ("tcp_congestion=cu bic", "not a congestion control"),
            ("allowed_origins=copy.sh", "not an origin"),
            ("allowed_origins=https://copy.sh/page", "not an origin"),
            ("auth_token=caf\u{e9}", "may contain only"),
            ("auth_token=a\"b", "may contain only"),
            ("auth_token=a&b", "may contain only"),
            ("auth_token=a%41", "may contain only"),
            ("tcp_congestion=a_name_far_too_long", "not a congestion control"),
        ] {
            let e = Config::default().apply_file_text("f", line).unwrap_err();
            assert!(e.to_string().contains(frag), "{line}: {e}");
        }
    }

    #[test]
    fn cross_key_checks_name_the_origin() {
        let mut c = Config::default();
        c.apply_file_text("f", "ws_server_port=9000\n\nidle_timeout=10s\n").unwrap();
        assert_eq!(c.validate().unwrap_err().origin, "f:3");
        let mut c = Config::default();
        c.set_from("dhcp_gateway", "10.0.0.1", "--dhcp-gateway".into()).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--dhcp-gateway: dhcp_gateway: 10.0.0.1 is not a host address of bridge_subnet 192.168.2.0/24"
        );
        let mut c = Config::default();
        c.set("tap_prefix", "wsnicbr").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn dhcp_keys() {
        let mut c = Config::default();
        c.apply_file_text("f", "dhcp_range=192.168.2.100 , 192.168.2.200\ndhcp_host=02:00:00:00:00:10,192.168.2.10; 02:00:00:00:00:11,192.168.2.11\n").unwrap();
        assert_eq!(c.dhcp_range, Some((Ipv4Addr::new(192, 168, 2, 100), Ipv4Addr::new(192, 168, 2, 200))));
        assert_eq!(c.dhcp_host.len(), 2);
        c.validate().unwrap();
        c.set_from("dhcp_range", "10.0.0.1-10.0.0.9", "f:9".into()).unwrap();
        assert_eq!(c.validate().unwrap_err().origin, "f:9");
        let mut c = Config::default();
        c.set_from("dhcp_host", "02:00:00:00:00:10,192.168.2.1", "f:2".into()).unwrap();
        assert!(c.validate().unwrap_err().to_string().starts_with("f:2: dhcp_host:"));
    }

    #[test]
    fn security_keys() {
        let mut c = Config::default();
        assert_eq!(
            (c.max_clients, c.max_clients_per_ip, c.anti_spoofing, c.egress_policy, c.client_isolation),
            (256, 8, true, true, false)
        );
        c.apply_file_text(
            "f",
            "trusted_proxies=10.0.0.0/8, ::1\nallowed_origins=https://copy.sh/ https://x.org\nauth_token=s3cret\negress_allow=192.168.1.0/24\nrate_limit=10mbit\n",
        )
        .unwrap();
        assert!(c.trusted_proxies[0].contains("10.9.8.7".parse().unwrap()));
        assert!(
            c.trusted_proxies[1].contains("::1".parse().unwrap())
                && !c.trusted_proxies[1].contains("::2".parse().unwrap())
        );
        assert_eq!(c.allowed_origins, ["https://copy.sh", "https://x.org"]);
        assert_eq!(c.rate_limit, Some(1_250_000));
        for (line, frag) in [
            ("max_clients=2000", "1023"),
            ("max_clients_per_ip=0", "at least 1"),
            ("trusted_proxies=10.0.0.0/40", "prefix"),
            ("auth_token=a/b", "may contain only"),
            ("rate_limit=fast", "not a rate"),
            ("rate_limit=1kbit", "at least"),
            ("egress_deny=10.0.0.1/8", "host bits"),
        ] {
            let e = Config::default().apply_file_text("f", line).unwrap_err();
            assert!(e.to_string().contains(frag), "{line}: {e}");
        }
    }

    #[test]
    fn names_the_kernel_and_browsers_use_are_accepted() {
        let mut c = Config::default();
        c.apply_file_text("f", "tcp_congestion=dctcp-reno\nauth_token=Zm9v+YmFy=\n").unwrap();
        assert_eq!(c.tcp_congestion.as_deref(), Some("dctcp-reno"));
        assert_eq!(c.auth_token.as_deref(), Some("Zm9v+YmFy="));
        c.apply_file_text("f", "status_allow=\n").unwrap();
        assert!(c.status_allow.is_empty(), "empty: the status page for nobody");
    }

    /// What the DHCP server would refuse at start is a configuration error naming the key.
    #[test]
    fn dhcp_pool_and_reservations_are_checked_with_the_rest() {
        let check = |text: &str| {
            let mut c = Config::default();
            c.apply_file_text("w.conf", text).unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        let twice = "dhcp_host=02:00:00:00:00:10,192.168.2.10 02:00:00:00:00:10,192.168.2.11\n";
        assert!(check(twice).unwrap_err().starts_with("w.conf:1: dhcp_host: 02:00:00:00:00:10 or"), "{twice}");
        let same_ip = "dhcp_host=02:00:00:00:00:10,192.168.2.10; 02:00:00:00:00:11,192.168.2.10\n";
        assert!(check(same_ip).unwrap_err().contains("reserved twice"));
        // A /30 has two hosts: the bridge's and one client's; reserving that one leaves none.
        let full = "bridge_subnet=10.0.0.0/30\ndhcp_host=02:00:00:00:00:10,10.0.0.2\n";
        assert_eq!(check(full).unwrap_err(), "w.conf:2: dhcp_host: leaves no address of 10.0.0.0/30 for the DHCP pool");
        let range = "dhcp_range=192.168.2.1-192.168.2.1\n";
        assert!(check(range).unwrap_err().starts_with("w.conf:1: dhcp_range: leaves no address"));
        assert!(check(&format!("{full}disable_dhcp=true\n")).is_ok(), "no pool needed without DHCP");
        let gw = "bridge_subnet=10.0.0.0/30\ndhcp_gateway=10.0.0.2\n";
        assert!(check(gw).unwrap_err().starts_with("w.conf:2: dhcp_gateway: leaves no address"), "{:?}", check(gw));
        let on_dns = "dhcp_domain_name_server=192.168.2.53\ndhcp_host=02:00:00:00:00:10,192.168.2.53\n";
        assert!(check(on_dns).unwrap_err().contains("is not a client address"), "{:?}", check(on_dns));
        let dns = "bridge_subnet=10.0.0.0/30\ndhcp_domain_name_server=10.0.0.2\n";
        assert!(
            check(dns).unwrap_err().starts_with("w.conf:2: dhcp_domain_name_server: leaves no"),
            "{:?}",
            check(dns)
        );
        assert!(check("bridge_subnet=10.0.0.0/30\n").is_ok());
    }

    #[test]
    fn workers_key() {
        let mut c = Config::default();
        assert_eq!((c.workers, c.worker_count()), (1, 1));
        c.set("workers", "auto").unwrap();
        assert_eq!(c.workers, 0);
        assert!((1..=64).contains(&c.worker_count()));
        c.set("workers", "0").unwrap();
        assert_eq!(c.workers, 0);
        c.set("workers", "64").unwrap();
        assert_eq!(c.worker_count(), 64);
        assert!(RESTART_KEYS.contains(&"workers"));
    }

    #[test]
    fn a_reload_shows_what_runs() {
        let running = Config::default();
        let mut new = Config::default();
        new.set("client_isolation", "true").unwrap(); // needs a restart
        new.set("max_frame_size", "1514").unwrap(); // needs a restart
        new.set("max_clients", "10").unwrap(); // applies at once
        new.set("rate_limit", "1mbit").unwrap();
        let s = new.summary_after_reload(&running, None);
        let get = |k: &str| s.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("client_isolation"), "off");
        assert_eq!(get("max_frame_size"), "65549");
        assert!(get("max_clients").starts_with("10 "), "{}", get("max_clients"));
        assert_eq!(get("rate_limit"), "1000 kbit/s");
        // Every entry not listed as reloaded is made only of keys that need a restart.
        for (k, _) in Config::default().summary(None) {
            let reloadable = SUMMARY_RELOADED.contains(&k);
            let keys: &[&str] = match k {
                "listen" => &["ws_server_addr", "ws_server_port", "wss_port"],
                "bridge" => &["bridge_name", "bridge_subnet"],
                "uplink" => &["eth_iface"],
                "nat" => &["nat"],
                "dhcp" => &["disable_dhcp", "dhcp_lease_time"],
                _ if reloadable => &[],
                other => &[other],
            };
            for key in keys {
                assert!(RESTART_KEYS.contains(key), "{k}: {key} is not a restart key");
            }
        }
    }

    #[test]
    fn every_restart_key_is_compared() {
        let c = Config::default();
        for k in RESTART_KEYS {
            assert!(KEYS.iter().any(|x| x.name == *k) && !c.value_of(k).is_empty(), "{k}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err() && parse_duration("s").is_err() && parse_duration("-1").is_err());
    }

    /// The template lists every key, with its built-in default, each preceded by a comment.
    #[test]
    fn template_lists_every_key_with_its_default() {
        let t = include_str!("../wsnic.conf.template");
        for k in KEYS {
            let line = format!("{}={}", k.name, k.default);
            assert!(t.lines().any(|l| l.trim() == line), "template lacks `{line}`");
        }
        let mut c = Config::default();
        c.apply_file_text("wsnic.conf.template", t).unwrap();
        assert_eq!(c, Config { origins: c.origins.clone(), set_order: c.set_order.clone(), ..Config::default() });
    }
}
