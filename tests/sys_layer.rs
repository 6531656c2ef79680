//! Integration tests of the Linux state layer (`wsnic::sys::{netlink,
//! firewall, sysctl}`) against the real kernel. Every test runs on its own
//! thread inside a fresh network namespace (`unshare(CLONE_NEWNET)` affects
//! only the calling thread; `ip`/`nft` children spawned from it inherit it),
//! so nothing is ever changed in the host's namespace. Needs root; without
//! the privilege to unshare, the tests print a notice and pass vacuously.

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;

use wsnic::sys::firewall::{self, NatRules};
use wsnic::sys::netlink::Netlink;
use wsnic::sys::sysctl;

/// Run `f` on a new thread moved into a fresh, empty network namespace.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    let handle = thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let err = io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "unshare: {err}");
            eprintln!("skipping: cannot create a network namespace ({err}); run as root");
            return;
        }
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn has_nft() -> bool {
    let ok = Command::new("nft").arg("--version").output().is_ok();
    if !ok {
        eprintln!("skipping: `nft` not installed");
    }
    ok
}

/// Run a command (in the calling thread's namespace), assert success, return stdout.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn netns_inode() -> String {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap().to_string_lossy().into_owned()
}

#[test]
fn children_inherit_the_thread_namespace() {
    let host = netns_inode();
    in_netns(move || {
        let mine = netns_inode();
        assert_ne!(mine, host, "unshare did not change the thread's namespace");
        let child = run(&["readlink", "/proc/self/ns/net"]);
        assert_eq!(child.trim(), mine, "child process is not in our namespace");
        // A fresh namespace holds nothing but a loopback device.
        let links = run(&["ip", "-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains(": lo:"), "{links}");
    });
}

#[test]
fn bridge_lifecycle() {
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        assert_eq!(nl.link_index("wsbr-t").unwrap(), None);
        let err = nl.link_index("name-far-too-long").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        let br = nl.create_bridge("wsbr-t").unwrap();
        assert_eq!(nl.link_index("wsbr-t").unwrap(), Some(br));
        assert_eq!(nl.link_name(br).unwrap().as_deref(), Some("wsbr-t"));
        assert!(nl.link_is_bridge(br).unwrap());
        let lo = nl.link_index("lo").unwrap().unwrap();
        assert!(!nl.link_is_bridge(lo).unwrap());
        let err = nl.create_bridge("wsbr-t").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));

        let gw = Ipv4Addr::new(10, 9, 0, 1);
        assert!(nl.add_ipv4(br, gw, 24).unwrap());
        assert!(!nl.add_ipv4(br, gw, 24).unwrap());
        let addrs = run(&["ip", "-j", "-4", "addr", "show", "dev", "wsbr-t"]);
        assert!(addrs.contains(r#""local":"10.9.0.1","prefixlen":24"#), "{addrs}");
        assert!(addrs.contains(r#""broadcast":"10.9.0.255""#), "{addrs}");

        nl.set_up(br).unwrap();
        let link = run(&["ip", "-j", "link", "show", "dev", "wsbr-t"]);
        assert!(link.contains(r#""UP""#), "{link}");

        run(&["ip", "link", "add", "wsv0", "type", "veth", "peer", "name", "wsv1"]);
        let v0 = nl.link_index("wsv0").unwrap().unwrap();
        assert!(!nl.link_is_bridge(v0).unwrap());
        nl.attach_up(v0, br).unwrap();
        let link = run(&["ip", "-j", "link", "show", "dev", "wsv0"]);
        assert!(link.contains(r#""master":"wsbr-t""#), "{link}");
        assert!(link.contains(r#""UP""#), "{link}");
        // Kernel errors keep their errno.
        let err = nl.attach_up(v0, 999_999).unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err:?}");

        nl.del_ipv4(br, gw, 24).unwrap();
        nl.del_ipv4(br, gw, 24).unwrap();
        let addrs = run(&["ip", "-j", "-4", "addr", "show", "dev", "wsbr-t"]);
        assert!(!addrs.contains("10.9.0.1"), "{addrs}");

        nl.delete_link(br).unwrap();
        nl.delete_link(br).unwrap();
        assert_eq!(nl.link_index("wsbr-t").unwrap(), None);
        assert_eq!(nl.link_name(br).unwrap(), None);
        let err = nl.link_is_bridge(br).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        nl.del_ipv4(br, gw, 24).unwrap();
        // The veth lost its master with the bridge but still exists.
        let link = run(&["ip", "-j", "link", "show", "dev", "wsv0"]);
        assert!(!link.contains("master"), "{link}");
    });
}

fn veth_with_addr(name: &str, peer: &str, cidr: &str) {
    run(&["ip", "link", "add", name, "type", "veth", "peer", "name", peer]);
    run(&["ip", "addr", "add", cidr, "dev", name]);
    run(&["ip", "link", "set", name, "up"]);
    run(&["ip", "link", "set", peer, "up"]);
}

#[test]
fn default_route_iface() {
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        assert_eq!(nl.default_route_iface().unwrap(), None);

        veth_with_addr("wsup0", "wsup1", "198.51.100.2/24");
        // Connected routes alone are not a default route.
        assert_eq!(nl.default_route_iface().unwrap(), None);
        run(&["ip", "route", "add", "default", "via", "198.51.100.1"]);
        assert_eq!(nl.default_route_iface().unwrap().as_deref(), Some("wsup0"));

        // Lowest metric wins; other tables are ignored.
        veth_with_addr("wsalt0", "wsalt1", "203.0.113.2/24");
        run(&["ip", "route", "add", "default", "via", "203.0.113.1", "metric", "100"]);
        assert_eq!(nl.default_route_iface().unwrap().as_deref(), Some("wsup0"));
        run(&["ip", "route", "del", "default", "via", "198.51.100.1"]);
        run(&["ip", "route", "add", "default", "via", "198.51.100.1", "metric", "200"]);
        run(&["ip", "route", "add", "default", "via", "198.51.100.1", "table", "100"]);
        assert_eq!(nl.default_route_iface().unwrap().as_deref(), Some("wsalt0"));

        // A multipath default route counts, via its first next hop.
        run(&["ip", "route", "flush", "table", "main", "exact", "0.0.0.0/0"]);
        assert_eq!(nl.default_route_iface().unwrap(), None);
        run(&["ip", "route", "add", "default", "nexthop", "via", "198.51.100.1", "nexthop", "via", "203.0.113.1"]);
        assert_eq!(nl.default_route_iface().unwrap().as_deref(), Some("wsup0"));
    });
}

const BRIDGE: &str = "wsbr0";

fn rules<'a>(table: &'a str, uplink: &'a str, masquerade: bool, restrict: bool) -> NatRules<'a> {
    NatRules {
        table,
        subnet: Ipv4Addr::new(10, 0, 2, 0),
        prefix: 24,
        bridge: BRIDGE,
        uplink: Some(uplink),
        masquerade,
        restrict_inbound: restrict,
    }
}

#[test]
fn firewall_apply_replace_remove() {
    if !has_nft() {
        return;
    }
    in_netns(|| {
        let t = "wsnic_t";
        run(&["nft", "add table inet keep; add chain inet keep c"]);
        assert!(!firewall::table_exists(t).unwrap());
        firewall::remove(t).unwrap(); // absent table: fine

        firewall::apply(&rules(t, "eth9", true, false)).unwrap();
        assert!(firewall::table_exists(t).unwrap());
        let listing = run(&["nft", "list", "table", "ip", t]);
        assert!(listing.contains(r#"ip saddr 10.0.2.0/24 oifname "eth9" masquerade"#), "{listing}");
        assert!(listing.contains(r#"iifname "wsbr0" oifname "eth9" accept"#), "{listing}");
        assert!(!listing.contains("drop"), "{listing}");

        // Applying again replaces the whole table atomically.
        firewall::apply(&rules(t, "eth8", false, true)).unwrap();
        let listing = run(&["nft", "list", "table", "ip", t]);
        assert!(!listing.contains("eth9"), "{listing}");
        assert!(!listing.contains("masquerade"), "{listing}");
        assert!(listing.contains(r#"iifname "wsbr0" oifname "eth8" accept"#), "{listing}");
        assert!(listing.contains(r#"iifname "eth8" oifname "wsbr0" ct state established,related accept"#), "{listing}");
        assert!(listing.contains(r#"iifname "eth8" oifname "wsbr0" drop"#), "{listing}");
        let tables = run(&["nft", "list", "tables"]);
        assert_eq!(tables.matches(&format!("table ip {t}\n")).count(), 1, "{tables}");

        firewall::remove(t).unwrap();
        firewall::remove(t).unwrap();
        assert!(!firewall::table_exists(t).unwrap());
        // The unrelated table was never touched.
        let keep = run(&["nft", "list", "table", "inet", "keep"]);
        assert!(keep.contains("chain c"), "{keep}");
    });
}

#[test]
fn firewall_errors_are_reported() {
    if !has_nft() {
        return;
    }
    in_netns(|| {
        // `ip` passes wsnic's name check but is an nft keyword: nft rejects
        // the script, and its diagnostic must reach the caller.
        let err = firewall::apply(&rules("ip", "eth0", true, false)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("nft") && msg.contains("Error"), "{msg}");
    });
}

#[test]
fn forward_drop_warning() {
    if !has_nft() {
        return;
    }
    in_netns(|| {
        let own = "wsnic_w";
        assert_eq!(firewall::forward_drop_warning(own, BRIDGE), None);
        firewall::apply(&rules(own, "eth0", true, true)).unwrap();
        assert_eq!(firewall::forward_drop_warning(own, BRIDGE), None);

        let other = "table inet other {\n chain forward {\n type filter hook forward priority 0; policy drop;\n }\n}\n";
        nft_script(other);
        let w = firewall::forward_drop_warning(own, BRIDGE).expect("warning");
        assert!(w.contains("`inet other forward`"), "{w}");
        assert!(w.contains(r#"nft insert rule inet other forward iifname "wsbr0" accept"#), "{w}");
        // Once the user lets the bridge through, the warning goes away.
        run(&["nft", r#"insert rule inet other forward iifname "wsbr0" accept"#]);
        assert_eq!(firewall::forward_drop_warning(own, BRIDGE), None);
        run(&["nft", "delete table inet other"]);

        // Docker-style iptables-nft ruleset.
        nft_script(
            "table ip filter {\n chain FORWARD {\n type filter hook forward priority 0; policy drop;\n }\n chain DOCKER-USER {\n }\n}\n",
        );
        let w = firewall::forward_drop_warning(own, BRIDGE).expect("warning");
        assert!(w.contains("`ip filter FORWARD`"), "{w}");
        assert!(w.contains("iptables -I DOCKER-USER -i wsbr0 -j ACCEPT"), "{w}");
        run(&["nft", "delete table ip filter"]);

        // Forward chains with policy drop that are IPv6-only or our own don't count.
        nft_script("table ip6 v6 {\n chain f {\n type filter hook forward priority 0; policy drop;\n }\n}\n");
        nft_script(&format!(
            "table ip {own} {{\n chain extra {{\n type filter hook forward priority 10; policy drop;\n }}\n}}\n"
        ));
        assert_eq!(firewall::forward_drop_warning(own, BRIDGE), None);
    });
}

fn nft_script(script: &str) {
    use std::io::Write;
    let mut child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft failed on:\n{script}");
}

#[test]
fn sysctl_round_trip_is_per_namespace() {
    let host = sysctl::read("net.ipv4.ip_forward").unwrap();
    // End on the opposite of the host's value: a leak would show.
    let last = if host == "1" { "0" } else { "1" };
    in_netns(move || {
        for value in ["0", "1", last] {
            sysctl::write("net.ipv4.ip_forward", value).unwrap();
            assert_eq!(sysctl::read("net.ipv4.ip_forward").unwrap(), value);
        }
        let err = sysctl::read("net.ipv4.no_such_knob").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    });
    assert_eq!(sysctl::read("net.ipv4.ip_forward").unwrap(), host);
}
