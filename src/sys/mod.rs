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
