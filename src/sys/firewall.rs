//! wsnic's own nftables table (family `ip`): source NAT of the bridge subnet
//! to the uplink, forwarding rules between bridge and uplink and, optionally,
//! an egress policy for traffic entering from the bridge; on an adopted bridge
//! with the egress policy, a table of the same name in family `bridge` that keeps
//! the clients' IPv6 from the host. Every change is one `nft -f -` script, which
//! nft applies as a single atomic kernel transaction.
//! No other table is ever modified; other tables are only read, to warn about
//! forward chains that would drop wsnic's traffic.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// What to put in wsnic's table.
#[derive(Debug, Clone, Copy)]
pub struct NatRules<'a> {
    pub table: &'a str,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub bridge: &'a str,
    pub uplink: Option<&'a str>,
    pub masquerade: bool,
    pub restrict_inbound: bool,
    /// Clients must not reach each other. Bridge port isolation stops frames
    /// between ports, but a client can still send a packet to another client's
    /// address through the gateway's MAC, and the host routes it back out of
    /// the bridge; this drops such bridge → bridge forwarding.
    pub client_isolation: bool,
    /// Restrict where clients may go; `None` leaves them unrestricted.
    pub egress: Option<Egress<'a>>,
    /// Drop IPv6 frames that bridge ports named `PREFIX*` (the clients' TAPs) send to the
    /// host itself, in a `bridge` family table of the same name; bridged IPv6 between
    /// ports passes. For an adopted bridge, whose IPv6 wsnic leaves on: the `ip` table's
    /// egress policy is IPv4 only.
    pub ipv6_ports: Option<&'a str>,
}

/// Egress policy for traffic entering from the bridge: to the host only DHCP,
/// DNS and ICMP to the gateway address (plus replies and `allow`); forwarded
/// only to the uplink, and not to private, special or `deny` ranges unless in
/// `allow`. `allow` and `deny` are `(network, prefix length)` pairs.
#[derive(Debug, Clone, Copy)]
pub struct Egress<'a> {
    pub gateway: Ipv4Addr,
    pub allow: &'a [(Ipv4Addr, u8)],
    pub deny: &'a [(Ipv4Addr, u8)],
}

/// Destinations clients never reach through the forward chain when the egress
/// policy is on (unless in its `allow` list): "this network", RFC 1918, CGNAT,
/// loopback, link-local (including 169.254.169.254, cloud metadata), multicast,
/// reserved and the limited broadcast address.
pub const DENIED_BY_DEFAULT: [(Ipv4Addr, u8); 10] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
    (Ipv4Addr::new(255, 255, 255, 255), 32),
];

/// The complete nft script for `r`: it creates the table if missing, deletes
/// it, and defines it afresh, so applying it atomically replaces any previous
/// version (e.g. one left behind by a crashed run).
///
/// Bridge → bridge forwarding (`iifname` and `oifname` both the bridge) is
/// either a client routing to another client through the gateway, or, when
/// `br_netfilter` is loaded (Docker loads it) with `bridge-nf-call-iptables`
/// set, ordinary bridged traffic inside the subnet. With client isolation it
/// is dropped (bridged traffic between isolated ports never reaches the hook);
/// without, the egress policy lets it through before its private-range drops.
pub fn render(r: &NatRules) -> String {
    let NatRules { table, bridge, .. } = *r;
    let prefix = r.prefix.min(32);
    let net = cidr(r.subnet, prefix);

    let mut s = String::new();
    if let Some(ports) = r.ipv6_ports {
        let _ = write!(
            s,
            "table bridge {table}\ndelete table bridge {table}\ntable bridge {table} {{\n\tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{ports}*\" ether type ip6 drop\n\t}}\n}}\n"
        );
    }
    let _ = write!(s, "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n");
    s.push_str("\tchain postrouting {\n");
    s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    if let (true, Some(up)) = (r.masquerade, r.uplink) {
        let _ = writeln!(s, "\t\tip saddr {net} oifname \"{up}\" masquerade");
    }
    s.push_str("\t}\n");
    if let Some(e) = &r.egress {
        let from = format!("\t\tiifname \"{bridge}\"");
        let gw = e.gateway;
        s.push_str("\tchain input {\n");
        s.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
        let _ = writeln!(s, "{from} ct state established,related accept");
        let _ = writeln!(s, "{from} ip daddr {gw} udp dport {{ 53, 67 }} accept");
        let _ = writeln!(s, "{from} ip daddr 255.255.255.255 udp dport 67 accept");
        let _ = writeln!(s, "{from} ip daddr {gw} tcp dport 53 accept");
        let _ = writeln!(s, "{from} ip daddr {gw} ip protocol icmp accept");
        if !e.allow.is_empty() {
            let _ = writeln!(s, "{from} ip daddr {} accept", set(e.allow));
        }
        let _ = writeln!(s, "{from} drop");
        s.push_str("\t}\n");
    }
    s.push_str("\tchain forward {\n");
    s.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    if r.client_isolation {
        let _ = writeln!(s, "\t\tiifname \"{bridge}\" oifname \"{bridge}\" drop");
    }
    if let Some(e) = &r.egress {
        let from = format!("\t\tiifname \"{bridge}\"");
        let _ = writeln!(s, "{from} ct state established,related accept");
        if !r.client_isolation {
            let _ = writeln!(s, "{from} oifname \"{bridge}\" accept");
        }
        if !e.allow.is_empty() {
            let _ = writeln!(s, "{from} ip daddr {} accept", set(e.allow));
        }
        if !e.deny.is_empty() {
            let _ = writeln!(s, "{from} ip daddr {} drop", set(e.deny));
        }
        let _ = writeln!(s, "{from} ip daddr {} drop", set(&DENIED_BY_DEFAULT));
    }
    if let Some(up) = r.uplink {
        let _ = writeln!(s, "\t\tiifname \"{bridge}\" oifname \"{up}\" accept");
        let _ = writeln!(s, "\t\tiifname \"{up}\" oifname \"{bridge}\" ct state established,related accept");
        if r.restrict_inbound {
            let _ = writeln!(s, "\t\tiifname \"{up}\" oifname \"{bridge}\" drop");
        }
    }
    if r.egress.is_some() {
        let _ = writeln!(s, "\t\tiifname \"{bridge}\" drop");
    }
    s.push_str("\t}\n}\n");
    s
}

/// `addr/prefix` with the host bits cleared.
fn cidr(addr: Ipv4Addr, prefix: u8) -> String {
    let prefix = prefix.min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    format!("{}/{prefix}", Ipv4Addr::from(u32::from(addr) & mask))
}

/// An anonymous nft set of networks, e.g. `{ 10.0.0.0/8, 192.0.2.7/32 }`.
/// nft merges overlapping intervals of anonymous sets itself.
fn set(nets: &[(Ipv4Addr, u8)]) -> String {
    let items: Vec<String> = nets.iter().map(|&(a, p)| cidr(a, p)).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Atomically create or replace wsnic's table with the rules `r` describes.
pub fn apply(r: &NatRules) -> io::Result<()> {
    check_table(r.table)?;
    check_ifname(r.bridge)?;
    for name in r.uplink.iter().chain(&r.ipv6_ports) {
        check_ifname(name)?;
    }
    let egress_nets = r.egress.iter().flat_map(|e| e.allow.iter().chain(e.deny));
    for &(addr, prefix) in std::iter::once(&(r.subnet, r.prefix)).chain(egress_nets) {
        if prefix > 32 {
            return Err(invalid(format!("invalid IPv4 prefix length {addr}/{prefix}")));
        }
    }
    nft(&["-f", "-"], Some(&render(r))).map(drop)
}

/// Atomically delete the table, and its `bridge` family twin with `bridge_family`;
/// succeeds if they do not exist.
pub fn remove(table: &str, bridge_family: bool) -> io::Result<()> {
    check_table(table)?;
    let mut script = format!("table ip {table}\ndelete table ip {table}\n");
    if bridge_family {
        let _ = write!(script, "table bridge {table}\ndelete table bridge {table}\n");
    }
    nft(&["-f", "-"], Some(&script)).map(drop)
}

/// Whether `table ip TABLE` exists.
pub fn table_exists(table: &str) -> io::Result<bool> {
    check_table(table)?;
    let out = nft(&["list", "tables", "ip"], None)?;
    let wanted = format!("table ip {table}");
    Ok(out.lines().any(|l| l.trim() == wanted))
}

/// A warning if another table has an IPv4 forward base chain with policy
/// drop that does not mention `bridge` in any rule: such a chain drops the
/// traffic wsnic's own table accepts (in nftables every base chain of a hook
/// must accept a packet). One sentence per offending chain, saying how to fix
/// it. `None` if all is well or the ruleset cannot be read.
pub fn forward_drop_warning(own_table: &str, bridge: &str) -> Option<String> {
    let chains = match list_chains() {
        Ok(c) => c,
        Err(e) => {
            log::debug!("cannot inspect nftables forward chains: {e}");
            return None;
        }
    };
    let mut warnings = Vec::new();
    for c in &chains {
        let relevant = matches!(c.family.as_str(), "ip" | "inet")
            && c.hook.as_deref() == Some("forward")
            && c.policy.as_deref() == Some("drop")
            && !(c.family == "ip" && c.table == own_table);
        if !relevant || table_mentions(&c.family, &c.table, bridge) {
            continue;
        }
        let docker = chains.iter().any(|o| o.family == c.family && o.table == c.table && o.name == "DOCKER-USER");
        let (family, table, name) = (&c.family, &c.table, &c.name);
        let fix = if docker {
            format!(
                "`iptables -I DOCKER-USER -i {bridge} -j ACCEPT` and \
                 `iptables -I DOCKER-USER -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`"
            )
        } else if family == "ip" && table == "filter" && name == "FORWARD" {
            format!(
                "`iptables -I FORWARD -i {bridge} -j ACCEPT` and \
                 `iptables -I FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`"
            )
        } else {
            format!(
                "`nft insert rule {family} {table} {name} iifname \"{bridge}\" accept` and \
                 `nft insert rule {family} {table} {name} oifname \"{bridge}\" ct state established,related accept`"
            )
        };
        warnings.push(format!(
            "nftables chain `{family} {table} {name}`{} is a forward hook with policy drop, so it \
             drops traffic between bridge {bridge} and the uplink that it does not explicitly \
             accept; allow that traffic with {fix}.",
            if docker { " (Docker)" } else { "" }
        ));
    }
    (!warnings.is_empty()).then(|| warnings.join(" "))
}

#[derive(Debug)]
struct ChainInfo {
    family: String,
    table: String,
    name: String,
    hook: Option<String>,
    policy: Option<String>,
}

fn list_chains() -> io::Result<Vec<ChainInfo>> {
    let out = nft(&["-j", "list", "chains"], None)?;
    let root = json::parse(&out).ok_or_else(|| invalid("unparsable `nft -j` output".into()))?;
    let items = root.get("nftables").and_then(json::Value::as_array);
    Ok(items
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let c = item.get("chain")?;
            let field = |k: &str| c.get(k).and_then(json::Value::as_str).map(str::to_owned);
            Some(ChainInfo {
                family: field("family")?,
                table: field("table")?,
                name: field("name")?,
                hook: field("hook"),
                policy: field("policy"),
            })
        })
        .collect())
}

/// Whether any rule of the table contains the string `word` (e.g. an
/// `iifname "BRIDGE"` match someone added to let wsnic's traffic through).
fn table_mentions(family: &str, table: &str, word: &str) -> bool {
    let Ok(out) = nft(&["-j", "list", "table", family, table], None) else {
        return false;
    };
    let Some(root) = json::parse(&out) else {
        return false;
    };
    let items = root.get("nftables").and_then(json::Value::as_array);
    items.into_iter().flatten().filter_map(|item| item.get("rule")).any(|rule| rule.contains_str(word))
}

/// Run nft with `args`, feeding `stdin` if given; returns its stdout.
fn nft(args: &[&str], stdin: Option<&str>) -> io::Result<String> {
    let mut child = None;
    for prog in ["nft", "/usr/sbin/nft", "/sbin/nft"] {
        match Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            r => {
                child = Some(r?);
                break;
            }
        }
    }
    let mut child = child.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the `nft` command was not found; install the nftables package \
             (e.g. `apt-get install nftables`)",
        )
    })?;
    if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // If nft exits early the write fails with EPIPE; its stderr says why.
        if let Err(e) = pipe.write_all(script.as_bytes()) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!("`nft {}` failed ({}): {}", args.join(" "), out.status, stderr.trim())));
    }
    String::from_utf8(out.stdout).map_err(|_| invalid("non-UTF-8 output from nft".into()))
}

/// nft identifiers: a letter or `_`, then letters, digits, `_` or `-`.
fn check_table(name: &str) -> io::Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("invalid nftables table name {name:?}")))
    }
}

/// Interface names are quoted in the script; refuse anything that could
/// break out of the quotes.
fn check_ifname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '/'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("invalid interface name {name:?}")))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Just enough JSON to read `nft -j` output.
mod json {
    #[derive(Debug, PartialEq)]
    pub enum Value {
        Scalar, // null, booleans and numbers: never needed
        Str(String),
        Arr(Vec<Value>),
        Obj(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Str(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Arr(a) => Some(a),
                _ => None,
            }
        }

        /// Whether `s` occurs as a string value anywhere inside.
        pub fn contains_str(&self, s: &str) -> bool {
            match self {
                Value::Scalar => false,
                Value::Str(v) => v == s,
                Value::Arr(a) => a.iter().any(|v| v.contains_str(s)),
                Value::Obj(o) => o.iter().any(|(_, v)| v.contains_str(s)),
            }
        }
    }

    pub fn parse(text: &str) -> Option<Value> {
        let mut p = Parser { s: text.as_bytes(), i: 0 };
        let v = p.value(0)?;
        p.ws();
        (p.i == p.s.len()).then_some(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
                self.i += 1;
            }
        }

        fn eat(&mut self, b: u8) -> bool {
            self.ws();
            let hit = self.s.get(self.i) == Some(&b);
            self.i += usize::from(hit);
            hit
        }

        fn value(&mut self, depth: u32) -> Option<Value> {
            if depth > 64 {
                return None;
            }
            self.ws();
            match *self.s.get(self.i)? {
                b'"' => self.string().map(Value::Str),
                b'[' => {
                    self.i += 1;
                    let mut items = Vec::new();
                    if !self.eat(b']') {
                        loop {
                            items.push(self.value(depth + 1)?);
                            if self.eat(b']') {
                                break;
                            }
                            self.eat(b',').then_some(())?;
                        }
                    }
                    Some(Value::Arr(items))
                }
                b'{' => {
                    self.i += 1;
                    let mut fields = Vec::new();
                    if !self.eat(b'}') {
                        loop {
                            self.ws();
                            let key = self.string()?;
                            self.eat(b':').then_some(())?;
                            fields.push((key, self.value(depth + 1)?));
                            if self.eat(b'}') {
                                break;
                            }
                            self.eat(b',').then_some(())?;
                        }
                    }
                    Some(Value::Obj(fields))
                }
                _ => {
                    let start = self.i;
                    while self.s.get(self.i).is_some_and(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b)) {
                        self.i += 1;
                    }
                    (self.i > start).then_some(Value::Scalar)
                }
            }
        }

        fn string(&mut self) -> Option<String> {
            (self.s.get(self.i) == Some(&b'"')).then_some(())?;
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let b = *self.s.get(self.i)?;
                self.i += 1;
                match b {
                    b'"' => return String::from_utf8(out).ok(),
                    b'\\' => {
                        let e = *self.s.get(self.i)?;
                        self.i += 1;
                        let c = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = std::str::from_utf8(self.s.get(self.i..self.i + 4)?).ok()?;
                                self.i += 4;
                                // Surrogate halves are not decoded: never needed here.
                                char::from_u32(u32::from_str_radix(hex, 16).ok()?).unwrap_or('\u{fffd}')
                            }
                            other => char::from(other),
                        };
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    _ => out.push(b),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(uplink: Option<&str>, masquerade: bool, restrict_inbound: bool) -> NatRules<'_> {
        NatRules {
            table: "wsnic",
            subnet: Ipv4Addr::new(10, 0, 2, 1),
            prefix: 24,
            bridge: "wsbr0",
            uplink,
            masquerade,
            restrict_inbound,
            client_isolation: false,
            egress: None,
            ipv6_ports: None,
        }
    }

    const ALLOW: [(Ipv4Addr, u8); 2] = [(Ipv4Addr::new(192, 168, 1, 0), 24), (Ipv4Addr::new(10, 1, 2, 3), 32)];
    const DENY: [(Ipv4Addr, u8); 1] = [(Ipv4Addr::new(203, 0, 113, 0), 24)];

    fn egress<'a>(allow: &'a [(Ipv4Addr, u8)], deny: &'a [(Ipv4Addr, u8)]) -> Option<Egress<'a>> {
        Some(Egress { gateway: Ipv4Addr::new(10, 0, 2, 1), allow, deny })
    }

    #[test]
    fn render_egress() {
        let mut r = rules(Some("eth0"), true, true);
        r.egress = egress(&ALLOW, &DENY);
        assert_eq!(
            render(&r),
            "table ip wsnic\n\
             delete table ip wsnic\n\
             table ip wsnic {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.0.2.0/24 oifname \"eth0\" masquerade\n\
             \t}\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"wsbr0\" ct state established,related accept\n\
             \t\tiifname \"wsbr0\" ip daddr 10.0.2.1 udp dport { 53, 67 } accept\n\
             \t\tiifname \"wsbr0\" ip daddr 255.255.255.255 udp dport 67 accept\n\
             \t\tiifname \"wsbr0\" ip daddr 10.0.2.1 tcp dport 53 accept\n\
             \t\tiifname \"wsbr0\" ip daddr 10.0.2.1 ip protocol icmp accept\n\
             \t\tiifname \"wsbr0\" ip daddr { 192.168.1.0/24, 10.1.2.3/32 } accept\n\
             \t\tiifname \"wsbr0\" drop\n\
             \t}\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"wsbr0\" ct state established,related accept\n\
             \t\tiifname \"wsbr0\" oifname \"wsbr0\" accept\n\
             \t\tiifname \"wsbr0\" ip daddr { 192.168.1.0/24, 10.1.2.3/32 } accept\n\
             \t\tiifname \"wsbr0\" ip daddr { 203.0.113.0/24 } drop\n\
             \t\tiifname \"wsbr0\" ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, \
             169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4, 255.255.255.255/32 } drop\n\
             \t\tiifname \"wsbr0\" oifname \"eth0\" accept\n\
             \t\tiifname \"eth0\" oifname \"wsbr0\" ct state established,related accept\n\
             \t\tiifname \"eth0\" oifname \"wsbr0\" drop\n\
             \t\tiifname \"wsbr0\" drop\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn render_egress_edge_cases() {
        // Empty lists: no rule with an empty set (a syntax error in nft).
        let mut r = rules(Some("eth0"), false, false);
        r.egress = egress(&[], &[]);
        let s = render(&r);
        assert!(!s.contains("{  }") && !s.contains("{ }"), "{s}");
        assert_eq!(s.matches("ip daddr {").count(), 1, "{s}"); // the built-in ranges
        assert!(!s.contains("policy drop"));
        // Host bits are cleared; the last forward rule drops everything else from the bridge.
        let odd = [(Ipv4Addr::new(192, 0, 2, 77), 24)];
        r.egress = egress(&odd, &odd);
        let s = render(&r);
        assert!(s.contains("ip daddr { 192.0.2.0/24 } accept\n") && s.contains("ip daddr { 192.0.2.0/24 } drop\n"));
        assert!(s.ends_with("\t\tiifname \"wsbr0\" drop\n\t}\n}\n"), "{s}");
        // Without an uplink nothing is forwarded from the bridge but the allow list.
        let mut r = rules(None, true, true);
        r.egress = egress(&ALLOW, &[]);
        let s = render(&r);
        assert!(!s.contains("oifname \"eth0\""));
        assert!(s.contains("\t\tiifname \"wsbr0\" ip daddr { 192.168.1.0/24, 10.1.2.3/32 } accept\n"));
        assert!(s.ends_with("\t\tiifname \"wsbr0\" drop\n\t}\n}\n"), "{s}");
        let mut r = rules(Some("eth0"), true, true);
        let bad = [(Ipv4Addr::new(1, 2, 3, 4), 33)];
        r.egress = egress(&[], &bad);
        assert_eq!(apply(&r).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn render_client_isolation() {
        let mut r = rules(Some("eth0"), true, true);
        r.client_isolation = true;
        let s = render(&r);
        let fwd = s.split("chain forward {\n").nth(1).unwrap();
        let first_rule = fwd.lines().nth(1).unwrap();
        assert_eq!(first_rule, "\t\tiifname \"wsbr0\" oifname \"wsbr0\" drop");
        assert!(!s.contains("chain input"));
        // With the egress policy: dropped before anything else, never accepted.
        r.egress = egress(&ALLOW, &DENY);
        let s = render(&r);
        let fwd = s.split("chain forward {\n").nth(1).unwrap();
        assert_eq!(fwd.lines().nth(1).unwrap(), first_rule);
        assert!(!s.contains("oifname \"wsbr0\" accept"), "{s}");
    }

    #[test]
    fn render_full() {
        assert_eq!(
            render(&rules(Some("eth0"), true, true)),
            "table ip wsnic\n\
             delete table ip wsnic\n\
             table ip wsnic {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.0.2.0/24 oifname \"eth0\" masquerade\n\
             \t}\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"wsbr0\" oifname \"eth0\" accept\n\
             \t\tiifname \"eth0\" oifname \"wsbr0\" ct state established,related accept\n\
             \t\tiifname \"eth0\" oifname \"wsbr0\" drop\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn render_without_masquerade_or_restriction() {
        let s = render(&rules(Some("eth0"), false, false));
        assert!(!s.contains("masquerade"));
        assert!(!s.contains(" drop"));
        assert!(s.contains("iifname \"wsbr0\" oifname \"eth0\" accept\n"));
        assert!(s.contains("ct state established,related accept\n"));
        assert!(s.contains("policy accept;"));
    }

    #[test]
    fn render_without_uplink() {
        let s = render(&rules(None, true, true));
        assert!(!s.contains("oifname"));
        assert!(!s.contains("iifname"));
        assert!(s.starts_with("table ip wsnic\ndelete table ip wsnic\ntable ip wsnic {\n"));
        assert!(s.contains("hook postrouting") && s.contains("hook forward"));
        assert!(!s.contains("policy drop"));
    }

    #[test]
    fn render_masks_host_bits() {
        let mut r = rules(Some("eth0"), true, false);
        r.subnet = Ipv4Addr::new(192, 168, 77, 200);
        r.prefix = 20;
        assert!(render(&r).contains("ip saddr 192.168.64.0/20 "));
        r.prefix = 32;
        assert!(render(&r).contains("ip saddr 192.168.77.200/32 "));
    }

    #[test]
    fn names_are_validated() {
        assert!(check_table("wsnic").is_ok());
        assert!(check_table("ws_nic-2").is_ok());
        for bad in ["", "1abc", "a b", "a;b", "a\nb", "a{"] {
            assert!(check_table(bad).is_err(), "{bad:?}");
        }
        assert!(check_ifname("eth0.100").is_ok());
        for bad in ["", "a\"b", "a b", "a\\b", "0123456789abcdef"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        let mut r = rules(Some("up\"; flush ruleset"), true, false);
        assert_eq!(apply(&r).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        r.uplink = Some("eth0");
        r.prefix = 33;
        assert_eq!(apply(&r).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn json_parsing() {
        let v = json::parse(
            r#" {"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1,
                 "type": "filter", "hook": "forward", "prio": -1.5e2, "policy": "drop",
                 "x": [true, false, null, "a\"}\\\u00e9\n"], "y": {}, "z": []}}]} "#,
        )
        .unwrap();
        let items = v.get("nftables").unwrap().as_array().unwrap();
        let chain = items[1].get("chain").unwrap();
        assert_eq!(chain.get("hook").unwrap().as_str(), Some("forward"));
        assert_eq!(chain.get("policy").unwrap().as_str(), Some("drop"));
        assert!(chain.contains_str("a\"}\\\u{e9}\n"));
        assert!(!chain.contains_str("nat"));
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "\"abc", "[] x"] {
            assert_eq!(json::parse(bad), None, "{bad:?}");
        }
    }
}
