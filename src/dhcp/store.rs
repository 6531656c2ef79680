//! The lease file: one lease per line, text, written atomically.
//!
//! ```text
//! # wsnic DHCP leases v1: ip mac expires client-key hostname
//! 192.168.2.10 52:54:00:12:34:56 1732530000 01525400123456 my-host
//! ```
//!
//! `expires` is unix seconds; `client-key` is hex; the host name is `-` when empty, else its
//! bytes with `%`, every byte outside `!`..`~`, and a lone `-` written as `%XX`, so that any byte
//! string round-trips. Blank lines and further `#` lines are ignored.
//!
//! [`save`] writes `<file>.tmp` in the same directory, fsyncs it, renames it over the file and
//! fsyncs the directory: a crash at any moment leaves the old file or the new one, never a torn
//! one. A temp file left by a crash is overwritten by the next save and never read.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::server::Lease;

const HEADER: &str = "# wsnic DHCP leases v1: ip mac expires client-key hostname";

/// Reads the lease file. A missing file is no leases; anything unreadable is an error naming the
/// file and line.
pub fn load(path: &Path) -> Result<Vec<Lease>, String> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let err = |line: usize, what: &str| format!("{}:{line}: {what}", path.display());
    let text = String::from_utf8(text).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count();
        err(line, "not UTF-8")
    })?;
    let mut leases = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if n == 1 {
            if line != HEADER {
                return Err(err(1, &format!("not a wsnic lease file (expected {HEADER:?})")));
            }
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        leases.push(parse_line(line).map_err(|what| err(n, &what))?);
    }
    if text.is_empty() {
        return Err(err(1, "empty file (expected the header line)"));
    }
    Ok(leases)
}

fn parse_line(line: &str) -> Result<Lease, String> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let [ip, mac, expires, key, host] = fields[..] else {
        return Err(format!("expected 5 fields (ip mac expires client-key hostname), found {}", fields.len()));
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    let mac = parse_mac(mac).ok_or_else(|| format!("{mac:?} is not a MAC address"))?;
    let expires: u64 = expires.parse().map_err(|_| format!("{expires:?} is not a time in unix seconds"))?;
    let client_key = unhex(key).filter(|k| !k.is_empty()).ok_or_else(|| format!("{key:?} is not a hex client key"))?;
    let hostname = unescape(host).ok_or_else(|| format!("{host:?} is not an escaped host name"))?;
    Ok(Lease { ip, mac, client_key, hostname, expires, conn: None })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2).map(|p| Some(hex_val(p[0])? << 4 | hex_val(p[1])?)).collect()
}

fn escape(host: &[u8], out: &mut String) {
    if host.is_empty() {
        out.push('-');
        return;
    }
    if host == b"-" {
        out.push_str("%2D");
        return;
    }
    for &b in host {
        if b == b'%' || !(b'!'..=b'~').contains(&b) {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        return Some(Vec::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (h, l) = (hex_val(*b.get(i + 1)?)?, hex_val(*b.get(i + 2)?)?);
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn render<'a>(leases: impl Iterator<Item = &'a Lease>) -> String {
    let mut s = String::with_capacity(4096);
    s.push_str(HEADER);
    s.push('\n');
    for l in leases {
        let m = l.mac;
        let _ = write!(
            s,
            "{} {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} {} ",
            l.ip, m[0], m[1], m[2], m[3], m[4], m[5], l.expires
        );
        for b in &l.client_key {
            let _ = write!(s, "{b:02x}");
        }
        s.push(' ');
        escape(&l.hostname, &mut s);
        s.push('\n');
    }
    s
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces the lease file atomically (see the module documentation).
pub fn save<'a>(path: &Path, leases: impl Iterator<Item = &'a Lease>) -> io::Result<()> {
    let text = render(leases);
    let tmp = temp_path(path);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(i: u8, host: &[u8]) -> Lease {
        Lease {
            ip: Ipv4Addr::new(192, 168, 2, 10 + i),
            mac: [0x52, 0x54, 0, 0x12, 0x34, i],
            client_key: vec![1, 0x52, 0x54, 0, 0x12, 0x34, i],
            hostname: host.to_vec(),
            expires: 1_732_530_000 + u64::from(i),
            conn: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wsnic-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_format() {
        let d = dir("rt");
        let path = d.join("leases");
        assert_eq!(load(&path).unwrap(), vec![]); // missing file
        let all: Vec<Lease> = [&b"vm-1"[..], b"", b"-", b"a b%c\n\xff\x00", b"--"]
            .iter()
            .enumerate()
            .map(|(i, h)| lease(i as u8, h))
            .collect();
        save(&path, all.iter()).unwrap();
        assert_eq!(load(&path).unwrap(), all);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER);
        assert_eq!(lines[1], "192.168.2.10 52:54:00:12:34:00 1732530000 01525400123400 vm-1");
        assert!(lines[2].ends_with(" -") && lines[3].ends_with(" %2D"));
        assert!(lines[4].ends_with(" a%20b%25c%0A%FF%00") && lines[5].ends_with(" --"));
        // Saving nothing leaves a valid, empty file.
        save(&path, [].iter()).unwrap();
        assert_eq!(load(&path).unwrap(), vec![]);
        assert!(!temp_path(&path).exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn leftover_temp_file_does_not_matter() {
        let d = dir("tmp");
        let path = d.join("leases");
        // A crash after writing a partial temp file, before the rename.
        fs::write(temp_path(&path), "garbage that is longer than the real file will be\n".repeat(100)).unwrap();
        assert_eq!(load(&path).unwrap(), vec![]);
        save(&path, [lease(1, b"x")].iter()).unwrap();
        assert_eq!(load(&path).unwrap(), vec![lease(1, b"x")]);
        // And with a good file in place, the leftover is ignored, then replaced.
        fs::write(temp_path(&path), "junk").unwrap();
        assert_eq!(load(&path).unwrap(), vec![lease(1, b"x")]);
        save(&path, [lease(2, b"y")].iter()).unwrap();
        assert_eq!(load(&path).unwrap(), vec![lease(2, b"y")]);
        // A relative path in the current directory works too (its directory is ".").
        assert_eq!(temp_path(Path::new("leases")), Path::new("leases.tmp"));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn corruption_names_file_and_line() {
        let d = dir("bad");
        let path = d.join("leases");
        let good = "192.168.2.10 52:54:00:12:34:00 1732530000 0152 vm";
        let cases = [
            ("", 1, "empty file"),
            ("hello\n", 1, "not a wsnic lease file"),
            (&format!("{HEADER}\n{good}\n\n# note\n192.168.2.300 52:54:00:12:34:00 1 01 -\n"), 5, "not an IPv4"),
            (&format!("{HEADER}\n{good} extra\n"), 2, "expected 5 fields"),
            (&format!("{HEADER}\n192.168.2.10 52:54:00:12:34 1 01 -\n"), 2, "not a MAC"),
            (&format!("{HEADER}\n192.168.2.10 52:54:00:12:34:00 -1 01 -\n"), 2, "unix seconds"),
            (&format!("{HEADER}\n192.168.2.10 52:54:00:12:34:00 1 0 -\n"), 2, "hex client key"),
            (&format!("{HEADER}\n192.168.2.10 52:54:00:12:34:00 1 - -\n"), 2, "hex client key"),
            (&format!("{HEADER}\n{good}\n192.168.2.10 52:54:00:12:34:00 1 01 a%4\n"), 3, "escaped host name"),
            (&format!("{HEADER}\n{good}\n{}", &good[..20]), 3, "expected 5 fields"), // torn last line
        ];
        for (text, line, what) in cases {
            fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err();
            assert!(e.starts_with(&format!("{}:{line}: ", path.display())), "{e}");
            assert!(e.contains(what), "{e}");
        }
        fs::write(&path, format!("{HEADER}\n{good}\n\u{0}\n")).unwrap();
        assert!(load(&path).unwrap_err().contains(":3: "));
        let mut bytes = format!("{HEADER}\n{good}\n").into_bytes();
        bytes.extend_from_slice(b"192.168.2.11 52:54:00:12:34:00 1 01 \xff\n");
        fs::write(&path, bytes).unwrap();
        assert!(load(&path).unwrap_err().ends_with(":3: not UTF-8"));
        fs::remove_dir_all(d).unwrap();
    }

    proptest! {
        #[test]
        fn host_names_round_trip(host in prop::collection::vec(any::<u8>(), 0..40)) {
            let mut s = String::new();
            escape(&host, &mut s);
            prop_assert!(!s.is_empty() && !s.contains(char::is_whitespace));
            prop_assert_eq!(unescape(&s), Some(host));
        }

        #[test]
        fn lines_round_trip(ip: u32, mac: [u8; 6], expires: u64, key in prop::collection::vec(any::<u8>(), 1..40),
                            host in prop::collection::vec(any::<u8>(), 0..40)) {
            let l = Lease { ip: ip.into(), mac, client_key: key, hostname: host, expires, conn: None };
            let text = render([&l].into_iter());
            let line = text.lines().nth(1).unwrap();
            prop_assert_eq!(parse_line(line).unwrap(), l);
        }
    }
}
