//! wsnic's own nftables table (family `ip`): source NAT of the bridge subnet
//! to the uplink and forwarding rules between bridge and uplink. Every change
//! is one `nft -f -` script, which nft applies as a single atomic kernel
//! transaction. No other table is ever modified; other tables are only read,
//! to warn about forward chains that would drop wsnic's traffic.

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
}

/// The complete nft script for `r`: it creates the table if missing, deletes
/// it, and defines it afresh, so applying it atomically replaces any previous
/// version (e.g. one left behind by a crashed run).
pub fn render(r: &NatRules) -> String {
    let NatRules { table, bridge, .. } = *r;
    let prefix = r.prefix.min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let net = Ipv4Addr::from(u32::from(r.subnet) & mask);

    let mut s = format!("table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n");
    s.push_str("\tchain postrouting {\n");
    s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    if let (true, Some(up)) = (r.masquerade, r.uplink) {
        let _ = writeln!(s, "\t\tip saddr {net}/{prefix} oifname \"{up}\" masquerade");
    }
    s.push_str("\t}\n\tchain forward {\n");
    s.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    if let Some(up) = r.uplink {
        let _ = writeln!(s, "\t\tiifname \"{bridge}\" oifname \"{up}\" accept");
        let _ = writeln!(s, "\t\tiifname \"{up}\" oifname \"{bridge}\" ct state established,related accept");
        if r.restrict_inbound {
            let _ = writeln!(s, "\t\tiifname \"{up}\" oifname \"{bridge}\" drop");
        }
    }
    s.push_str("\t}\n}\n");
    s
}

/// Atomically create or replace wsnic's table with the rules `r` describes.
pub fn apply(r: &NatRules) -> io::Result<()> {
    check_table(r.table)?;
    check_ifname(r.bridge)?;
    if let Some(up) = r.uplink {
        check_ifname(up)?;
    }
    if r.prefix > 32 {
        return Err(invalid(format!("invalid IPv4 prefix length /{}", r.prefix)));
    }
    nft(&["-f", "-"], Some(&render(r))).map(drop)
}

/// Atomically delete the table; succeeds if it does not exist.
pub fn remove(table: &str) -> io::Result<()> {
    check_table(table)?;
    let script = format!("table ip {table}\ndelete table ip {table}\n");
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
        }
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
