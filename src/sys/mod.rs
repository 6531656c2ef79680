//! Linux state, owned and reversible: TAP devices, rtnetlink (bridge, addresses, links),
//! wsnic's own nftables table and sysctls. Thin wrappers; policy lives in `netsetup`.

pub mod firewall;
pub mod netlink;
pub mod sysctl;
pub mod tap;

/// Does this process hold CAP_NET_ADMIN (root has it)?
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Can this process give a TCP socket congestion control `name`? Asks the kernel with a
/// socket that is never bound (the kernel loads the algorithm's module if it has one).
/// Setting one that `net.ipv4.tcp_allowed_congestion_control` does not list needs
/// CAP_NET_ADMIN.
pub fn check_tcp_congestion(name: &str) -> Result<(), String> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("cannot make a socket to try it: {e}"))?;
    s.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        let list = |what: &str| {
            let f = format!("/proc/sys/net/ipv4/tcp_{what}_congestion_control");
            std::fs::read_to_string(f).map_or_else(|_| "unknown".into(), |l| l.trim().to_string())
        };
        match e.raw_os_error() {
            Some(libc::ENOENT) => {
                format!("the kernel has no congestion control {name:?} (it has: {})", list("available"))
            }
            Some(libc::EPERM) => format!("{name:?} needs CAP_NET_ADMIN (allowed without it: {})", list("allowed")),
            _ => format!("cannot set {name:?}: {e}"),
        }
    })
}

/// Identity of the calling thread's network namespace, unique until reboot: the kernel's
/// netns cookie (SO_NETNS_COOKIE), which, unlike the namespace's inode number, is never
/// reused. State recorded for crash repair is keyed by it, so a new namespace can never
/// inherit a dead one's records.
pub fn netns_id() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket we close below; getsockopt writes at most `len` bytes into `cookie`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// A locally administered unicast MAC that stays the same for `seed` on this machine
/// (derived from /etc/machine-id, or the hostname where there is none).
pub fn stable_mac(seed: &str) -> [u8; 6] {
    use sha1::{Digest, Sha1};
    let id = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let h = Sha1::new().chain_update(id.trim()).chain_update(b"/wsnic/").chain_update(seed).finalize();
    let mut mac: [u8; 6] = h[..6].try_into().expect("6 bytes");
    mac[0] = (mac[0] & 0xfc) | 0x02; // unicast, locally administered
    mac
}

/// `aa:bb:cc:dd:ee:ff`
pub fn format_mac(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`); must be unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bad = || format!("{s:?} is not a MAC address like 02:00:00:12:34:56");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("{s} is not a unicast address"));
    }
    Ok(mac)
}

/// Raise the soft open-files limit to the hard limit (each client holds a socket and a TAP).
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit to fill and then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let a = stable_mac("wsnicbr0");
        assert_eq!(a, stable_mac("wsnicbr0"));
        assert_ne!(a, stable_mac("wsnicbr1"));
        assert_eq!(a[0] & 3, 2);
        assert_eq!(parse_mac(&format_mac(&a)), Ok(a));
        assert_eq!(parse_mac("02-00-00-00-00-01"), Ok([2, 0, 0, 0, 0, 1]));
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
