//! The host network state a relay needs — bridge with the gateway address, wsnic's nftables
//! table, `net.ipv4.ip_forward` — set up at start, recorded, and put back at exit.
//!
//! Before changing anything, what is about to change is written to a state file under
//! `/run/wsnic/` (one per network namespace and bridge). A run that dies (SIGKILL) leaves the
//! file behind; the next start reads it and undoes exactly what it lists, restoring the
//! `ip_forward` value from before the crashed run (and what switching it on changed besides:
//! `accept_redirects`, interfaces' `forwarding`). After a reboot `/run` is empty and so is
//! the kernel's state: nothing to repair. A bridge of the configured name that exists without
//! a state file is someone else's: it is adopted (address added if missing) and left in place.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::config::Config;
use crate::sys::{firewall, netlink::Netlink, sysctl};

const IP_FORWARD: &str = "net.ipv4.ip_forward";
const STATE_DIR: &str = "/run/wsnic";

/// What a run changed, as recorded in its state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Record {
    pid: u32,
    bridge: String,
    bridge_created: bool,
    /// The MAC a bridge we create gets (in the request that creates it): a bridge of that name
    /// without it is not ours. Recorded, not recomputed, since it derives from the machine id
    /// or the host name, which may change before a crash is repaired.
    bridge_mac: Option<[u8; 6]>,
    addr: Option<(Ipv4Addr, u8)>,
    table: String,
    ip_forward_before: Option<String>,
    /// Parameters that switching `ip_forward` on changes as well (the kernel sets
    /// `conf/all/accept_redirects` to its opposite, and `conf/default` and every interface's
    /// `forwarding` to it), with their values from before: put back after `ip_forward`. Only
    /// when `ip_forward` was 0 (else we do not change it).
    after_ip_forward: Vec<(String, String)>,
    /// The bridge's `disable_ipv6` before we set it (the egress policy is IPv4 only, so IPv6
    /// from clients to the host is switched off on the bridge). Only on a bridge we create:
    /// earlier versions set it on adopted bridges too, and their state files may say so.
    ipv6_before: Option<String>,
    /// The `bridge` family table that keeps clients' IPv6 from the host on an adopted bridge
    /// (where switching IPv6 off would delete the owner's IPv6 addresses for good).
    ipv6_filter: bool,
    /// An adopted bridge that was down, which we set up: set down again.
    bridge_was_down: bool,
}

impl Record {
    fn render(&self) -> String {
        let mut s = format!(
            "pid={}\nbridge={}\nbridge_created={}\ntable={}\n",
            self.pid, self.bridge, self.bridge_created, self.table
        );
        if let Some((a, p)) = self.addr {
            s += &format!("addr={a}/{p}\n");
        }
        if let Some(m) = &self.bridge_mac {
            s += &format!("bridge_mac={}\n", crate::sys::format_mac(m));
        }
        if let Some(v) = &self.ip_forward_before {
            s += &format!("ip_forward_before={v}\n");
        }
        for (name, v) in &self.after_ip_forward {
            s += &format!("after_ip_forward={name} {v}\n"); // names have no whitespace
        }
        if let Some(v) = &self.ipv6_before {
            s += &format!("ipv6_before={v}\n");
        }
        if self.ipv6_filter {
            s += "ipv6_filter=true\n";
        }
        if self.bridge_was_down {
            s += "bridge_was_down=true\n";
        }
        s
    }

    fn parse(text: &str) -> Option<Record> {
        let mut r = Record::default();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "pid" => r.pid = v.parse().ok()?,
                "bridge" => r.bridge = v.to_string(),
                "bridge_created" => r.bridge_created = v.parse().ok()?,
                "bridge_mac" => r.bridge_mac = Some(crate::sys::parse_mac(v).ok()?),
                "table" => r.table = v.to_string(),
                "addr" => {
                    let (a, p) = v.split_once('/')?;
                    r.addr = Some((a.parse().ok()?, p.parse().ok()?));
                }
                "ip_forward_before" => r.ip_forward_before = Some(v.to_string()),
                "after_ip_forward" => {
                    let (name, v) = v.rsplit_once(' ')?;
                    r.after_ip_forward.push((name.to_string(), v.to_string()));
                }
                "ipv6_before" => r.ipv6_before = Some(v.to_string()),
                "ipv6_filter" => r.ipv6_filter = v.parse().ok()?,
                "bridge_was_down" => r.bridge_was_down = v.parse().ok()?,
                _ => return None,
            }
        }
        (!r.bridge.is_empty() && !r.table.is_empty()).then_some(r)
    }
}

/// The relay's network, up. Call [`Network::down`] to put everything back.
pub struct Network {
    pub bridge_index: u32,
    pub bridge_mac: [u8; 6],
    pub uplink: Option<String>,
    nl: Netlink,
    record: Record,
    state_path: PathBuf,
    /// Held (flock) for the life of the process: how another start knows this run is alive.
    _lock: std::fs::File,
}

fn state_path(bridge: &str) -> io::Result<PathBuf> {
    Ok(PathBuf::from(format!("{STATE_DIR}/netns{}-{bridge}.state", crate::sys::netns_id()?)))
}

fn ctx(what: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> String {
    move |e| format!("{}: {e}", what())
}

/// Take the lock that marks a live run for `state` (its `.lock` sibling). `Ok(None)`: another
/// live process holds it. The kernel drops the lock when its holder dies, however it dies.
///
/// A run that exits removes its lock file after its last use; a start that opened the file
/// just before could then lock a file no longer in the directory, and a third start would
/// lock a new one beside it. So a lock counts only if the path still names the locked file.
fn try_lock(state: &std::path::Path) -> io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(STATE_DIR)?;
    let path = state.with_extension("lock");
    loop {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
                e => Err(e),
            };
        }
        if names(&path, &f) {
            return Ok(Some(f));
        }
        // Unlinked while we locked it: try again with the file the path names now.
    }
}

/// Does `path` name the open file `f` (same device and inode)?
fn names(path: &std::path::Path, f: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), f.metadata()) {
        (Ok(n), Ok(h)) => (n.dev(), n.ino()) == (h.dev(), h.ino()),
        _ => false,
    }
}

impl Network {
    pub fn up(cfg: &Config) -> Result<Network, String> {
        let nl = Netlink::open().map_err(ctx(|| "netlink".into()))?;
        let state_path = state_path(&cfg.bridge_name).map_err(ctx(|| "network namespace".into()))?;
        let Some(lock) = try_lock(&state_path).map_err(ctx(|| format!("lock for {}", state_path.display())))? else {
            return Err(format!("another wsnic is running with bridge {} in this network namespace", cfg.bridge_name));
        };
        // A start that fails leaves no lock file behind; the lock is held (through this
        // duplicate) until it is unlinked, as `down` does.
        let held = lock.try_clone().map_err(ctx(|| "lock".into()))?;
        let up = Self::up_locked(cfg, nl, state_path.clone(), lock);
        if up.is_err() {
            // Unless a teardown on the way unlinked it already, and another start has since
            // made (and locked) a new one there.
            let path = state_path.with_extension("lock");
            if names(&path, &held) {
                let _ = std::fs::remove_file(&path);
            }
        }
        drop(held);
        up
    }

    fn up_locked(cfg: &Config, mut nl: Netlink, state_path: PathBuf, lock: std::fs::File) -> Result<Network, String> {
        if let Ok(text) = std::fs::read_to_string(&state_path) {
            match Record::parse(&text) {
                Some(old) => {
                    log::warn!(
                        "a previous run (pid {}) did not exit cleanly; repairing what it left: {}",
                        old.pid,
                        state_path.display()
                    );
                    if !undo(&mut nl, &old) {
                        return Err(format!(
                            "could not put back everything a previous run left (see above); the record of it stays in \
                             {}, and the next start tries again",
                            state_path.display()
                        ));
                    }
                }
                None => {
                    return Err(format!(
                        "unreadable state file {}: a previous run may have left a bridge, an nftables table or \
                         sysctls behind; check them and remove the file",
                        state_path.display()
                    ))
                }
            }
            let _ = std::fs::remove_file(&state_path);
        }

        let uplink = match &cfg.eth_iface {
            Some(name) => {
                if nl.link_index(name).map_err(ctx(|| "netlink".into()))?.is_none() {
                    return Err(format!("eth_iface: no interface named {name}"));
                }
                Some(name.clone())
            }
            None => {
                let up = nl.default_route_iface().map_err(ctx(|| "reading the default route".into()))?;
                if up.is_none() && cfg.nat {
                    log::warn!("no IPv4 default route: clients reach the bridge and each other, but not beyond (set eth_iface to choose an uplink)");
                }
                up
            }
        };

        let existing = nl.link_index(&cfg.bridge_name).map_err(ctx(|| "netlink".into()))?;
        if let Some(i) = existing {
            if !nl.link_is_bridge(i).unwrap_or(false) {
                return Err(format!("bridge_name: {} exists and is not a bridge", cfg.bridge_name));
            }
            log::info!("adopting existing bridge {} (it will be left in place at exit)", cfg.bridge_name);
        }
        let forwarding = sysctl::read(IP_FORWARD).map_err(ctx(|| IP_FORWARD.into()))?;
        // Another wsnic here switched it on (one still running, or one that died and has not
        // been repaired yet): whichever of us stops last puts back what was there before the
        // first.
        let first = || {
            let others: Vec<Record> = other_records(&cfg.bridge_name).collect();
            let before_all = others.iter().position(|r| r.ip_forward_before.as_deref().is_some_and(|v| v != "1"));
            others.into_iter().nth(before_all.unwrap_or(0))
        };
        let (ip_forward_before, after_ip_forward) = match (forwarding == "1").then(first).flatten() {
            Some(other) => (other.ip_forward_before, other.after_ip_forward),
            _ if forwarding == "0" => (Some(forwarding), forwarding_side_effects()),
            _ => (Some(forwarding), Vec::new()),
        };
        let mut record = Record {
            pid: std::process::id(),
            bridge: cfg.bridge_name.clone(),
            bridge_created: existing.is_none(),
            bridge_mac: existing.is_none().then(|| crate::sys::stable_mac(&cfg.bridge_name)),
            addr: None,
            table: cfg.nft_table(),
            ip_forward_before,
            after_ip_forward,
            ipv6_before: None,
            ipv6_filter: false,
            bridge_was_down: false,
        };
        let mut net = Network {
            bridge_index: 0,
            bridge_mac: [0; 6],
            uplink,
            nl,
            record: record.clone(),
            state_path,
            _lock: lock,
        };
        net.save()?;
        if let Err(e) = net.apply(cfg, existing, &mut record) {
            net.record = record;
            net.down();
            return Err(e);
        }
        net.record = record;
        if let Err(e) = net.save() {
            net.down();
            return Err(e);
        }
        match net.nl.link_mac(net.bridge_index) {
            Ok(Some(mac)) => net.bridge_mac = mac,
            r => {
                let why = r.err().map_or("no MAC".to_string(), |e| e.to_string());
                net.down();
                return Err(format!("reading the MAC of {}: {why}", cfg.bridge_name));
            }
        }
        if let Some(w) = firewall::forward_drop_warning(&net.record.table, &cfg.bridge_name) {
            log::warn!("{w}");
        }
        Ok(net)
    }

    fn apply(&mut self, cfg: &Config, existing: Option<u32>, record: &mut Record) -> Result<(), String> {
        let br = &cfg.bridge_name;
        let index = match existing {
            Some(i) => i,
            // A fixed MAC: the gateway's stays the same as clients come and go, and across
            // restarts, so guests' ARP caches stay right. It is also how `undo` knows the
            // bridge of that name is still the one we made.
            None => match self.nl.create_bridge(br, record.bridge_mac.unwrap_or_else(|| crate::sys::stable_mac(br))) {
                Ok(i) => i,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        // Someone made it since we looked: not ours to delete.
                        record.bridge_created = false;
                        self.record.bridge_created = false;
                    }
                    return Err(format!("creating bridge {br}: {e}"));
                }
            },
        };
        self.bridge_index = index;
        let (addr, prefix) = (cfg.bridge_addr(), cfg.bridge_subnet.prefix);
        // Recorded before it is added, so that a run killed in between leaves no address
        // behind for good (crash repair deletes it, and deleting one that is absent is fine);
        // but only when the bridge does not have it already, which would then be deleted.
        let adding = || format!("adding {addr}/{prefix} to {br}");
        if !self.nl.has_ipv4(index, addr, prefix).map_err(ctx(adding))? {
            record.addr = Some((addr, prefix));
            self.record.addr = record.addr;
            self.save()?;
            if !self.nl.add_ipv4(index, addr, prefix).map_err(ctx(adding))? {
                // Someone added it since we looked: theirs, not to be deleted.
                record.addr = None;
                self.record.addr = None;
                self.save()?;
            }
        }
        if existing.is_some() && !self.nl.link_is_up(index).map_err(ctx(|| format!("reading {br}'s state")))? {
            record.bridge_was_down = true;
            self.record.bridge_was_down = true;
            self.save()?;
        }
        self.nl.set_up(index).map_err(ctx(|| format!("bringing {br} up")))?;
        let cidrs = |v: &[crate::config::Ipv4Net]| v.iter().map(|n| (n.addr, n.prefix)).collect::<Vec<_>>();
        let (allow, deny) = (cidrs(&cfg.egress_allow), cidrs(&cfg.egress_deny));
        // The egress policy is IPv4: without more, a client could reach the host's services
        // over the bridge's IPv6 addresses. A bridge we create gets IPv6 switched off (below);
        // on an adopted one that would delete its owner's static IPv6 addresses, which
        // switching it back on does not restore, so there a `bridge` table drops the
        // clients' IPv6 to the host instead.
        let ipv6_filter = cfg.egress_policy && existing.is_some();
        if ipv6_filter {
            record.ipv6_filter = true;
            self.record.ipv6_filter = true;
            self.save()?;
        }
        firewall::apply(&firewall::NatRules {
            table: &record.table,
            subnet: cfg.bridge_subnet.network(),
            prefix,
            bridge: br,
            uplink: self.uplink.as_deref(),
            masquerade: cfg.nat,
            restrict_inbound: cfg.bridge_restrict_inbound,
            client_isolation: cfg.client_isolation,
            egress: cfg.egress_policy.then_some(firewall::Egress { gateway: addr, allow: &allow, deny: &deny }),
            ipv6_ports: ipv6_filter.then_some(cfg.tap_prefix.as_str()),
        })
        .map_err(ctx(|| format!("nftables table {}", record.table)))?;
        if cfg.egress_policy && existing.is_none() {
            // The kernel then drops IPv6 to the host on the bridge; IPv6 between clients is
            // bridged and unaffected.
            let knob = disable_ipv6(br);
            if let Ok(before) = sysctl::read(&knob) {
                record.ipv6_before = Some(before);
                self.record.ipv6_before = record.ipv6_before.clone();
                self.save()?;
                sysctl::write(&knob, "1").map_err(ctx(|| knob.clone()))?;
            }
        }
        sysctl::write(IP_FORWARD, "1").map_err(ctx(|| IP_FORWARD.into()))?;
        Ok(())
    }

    fn save(&self) -> Result<(), String> {
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(STATE_DIR)?;
            let tmp = self.state_path.with_extension("tmp");
            std::fs::write(&tmp, self.record.render())?;
            std::fs::rename(&tmp, &self.state_path)
        };
        write().map_err(ctx(|| format!("state file {}", self.state_path.display())))
    }

    /// Put back everything this run changed.
    pub fn down(mut self) {
        let _ = undo(&mut self.nl, &self.record); // failures are logged
        let _ = std::fs::remove_file(&self.state_path);
        let _ = std::fs::remove_file(self.state_path.with_extension("lock"));
    }
}

/// The sysctl that switches IPv6 off on one interface (slash form: names may contain dots).
fn disable_ipv6(ifname: &str) -> String {
    format!("net/ipv6/conf/{ifname}/disable_ipv6")
}

/// The state files of the other wsnic runs (other bridges) in this namespace, live or dead.
fn other_state_files(bridge: &str) -> Vec<PathBuf> {
    let Ok(id) = crate::sys::netns_id() else { return Vec::new() };
    let prefix = format!("netns{id}-");
    let own = format!("{prefix}{bridge}.state");
    let Ok(dir) = std::fs::read_dir(STATE_DIR) else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".state") && name != own
        })
        .map(|e| e.path())
        .collect()
}

/// The state files of the other live wsnic runs (other bridges) in this namespace.
fn other_instance_files(bridge: &str) -> Vec<PathBuf> {
    other_state_files(bridge).into_iter().filter(|p| matches!(try_lock(p), Ok(None))).collect()
}

/// What the other wsnic runs in this namespace (other bridges) recorded, live or dead.
fn other_records(bridge: &str) -> impl Iterator<Item = Record> {
    other_state_files(bridge)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok().and_then(|t| Record::parse(&t)))
}

/// What switching `ip_forward` from 0 to 1 changes besides it, and back to 0 does not put
/// back (`devinet.c`, `inet_forward_change`): `conf/all/accept_redirects`, and the
/// `forwarding` of `conf/default` and of every interface.
fn forwarding_side_effects() -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut keep = |name: String| {
        if let Ok(value) = sysctl::read(&name) {
            v.push((name, value));
        }
    };
    keep("net/ipv4/conf/all/accept_redirects".into());
    if let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv4/conf") {
        for e in dir.filter_map(Result::ok) {
            let dev = e.file_name().to_string_lossy().into_owned();
            if dev != "all" {
                keep(format!("net/ipv4/conf/{dev}/forwarding"));
            }
        }
    }
    v
}

/// Undo what `r` records; every step is idempotent. Failures are logged, and the result says
/// whether everything was put back.
fn undo(nl: &mut Netlink, r: &Record) -> bool {
    let mut ok = true;
    let mut failed = |what: String| {
        log::error!("{what}");
        ok = false;
    };
    if let Err(e) = firewall::remove(&r.table, r.ipv6_filter) {
        failed(format!("removing nftables table {}: {e}", r.table));
    }
    match nl.link_index(&r.bridge) {
        Ok(Some(i)) if r.bridge_created => {
            // Created with our MAC in the same request: a bridge of that name without it was
            // made by someone else after ours was gone (or changed by hand), and is left alone.
            let ours = r.bridge_mac.unwrap_or_else(|| crate::sys::stable_mac(&r.bridge)); // older records
            if nl.link_mac(i).ok().flatten() != Some(ours) {
                log::warn!("not deleting bridge {}: its MAC is not the one wsnic gave it", r.bridge);
            } else if let Err(e) = nl.delete_link(i) {
                failed(format!("deleting bridge {}: {e}", r.bridge));
            }
        }
        Ok(Some(i)) => {
            if let Some(v) = &r.ipv6_before {
                if let Err(e) = sysctl::write(&disable_ipv6(&r.bridge), v) {
                    failed(format!("restoring IPv6 on {}: {e}", r.bridge));
                }
            }
            if let Some((a, p)) = r.addr {
                if let Err(e) = nl.del_ipv4(i, a, p) {
                    failed(format!("removing {a}/{p} from {}: {e}", r.bridge));
                }
            }
            if r.bridge_was_down {
                if let Err(e) = nl.set_down(i) {
                    failed(format!("setting {} down again: {e}", r.bridge));
                }
            }
        }
        Ok(None) => {}
        Err(e) => failed(format!("netlink: {e}")),
    }
    if let Some(v) = &r.ip_forward_before {
        // Put it back only if it is still what we set, and no other wsnic in this namespace
        // (another bridge) still needs forwarding.
        let still_ours = sysctl::read(IP_FORWARD).is_ok_and(|now| now == "1");
        if still_ours && other_instance_files(&r.bridge).is_empty() {
            if let Err(e) = sysctl::write(IP_FORWARD, v) {
                failed(format!("restoring {IP_FORWARD}={v}: {e}"));
            }
            for (name, v) in &r.after_ip_forward {
                match sysctl::read(name) {
                    Ok(now) if now != *v => {
                        if let Err(e) = sysctl::write(name, v) {
                            failed(format!("restoring {name}={v}: {e}"));
                        }
                    }
                    _ => {} // as it was, or the interface is gone
                }
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let r = Record {
            pid: 42,
            bridge: "wsnicbr0".into(),
            bridge_created: true,
            bridge_mac: Some([2, 0x11, 0x22, 0x33, 0x44, 0x55]),
            addr: Some((Ipv4Addr::new(192, 168, 2, 1), 24)),
            table: "wsnic_wsnicbr0".into(),
            ip_forward_before: Some("0".into()),
            after_ip_forward: vec![
                ("net/ipv4/conf/all/accept_redirects".into(), "0".into()),
                ("net/ipv4/conf/a=b.1/forwarding".into(), "1".into()),
            ],
            ipv6_before: Some("0".into()),
            ipv6_filter: true,
            bridge_was_down: true,
        };
        assert_eq!(Record::parse(&r.render()), Some(r));
        assert_eq!(Record::parse("garbage"), None);
        assert_eq!(Record::parse("pid=1\n"), None);
    }
}
