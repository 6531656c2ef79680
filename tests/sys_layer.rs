//! Integration tests of the Linux state layer (`wsnic::sys::{netlink,
//! firewall, sysctl}`) against the real kernel. Every test runs on its own
//! thread inside a fresh network namespace (`unshare(CLONE_NEWNET)` affects
//! only the calling thread; `ip`/`nft` children spawned from it inherit it),
//! so nothing is ever changed in the host's namespace. Needs root; without
//! the privilege to unshare, the tests print a notice and pass vacuously.

use std::io;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use wsnic::sys::firewall::{self, Egress, NatRules};
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

        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let br = nl.create_bridge("wsbr-t", mac).unwrap();
        assert_eq!(nl.link_index("wsbr-t").unwrap(), Some(br));
        assert_eq!(nl.link_mac(br).unwrap(), Some(mac), "the MAC is set at creation");
        assert_eq!(nl.link_name(br).unwrap().as_deref(), Some("wsbr-t"));
        assert!(nl.link_is_bridge(br).unwrap());
        let details = run(&["ip", "-d", "-j", "link", "show", "dev", "wsbr-t"]);
        assert!(details.contains(r#""mcast_snooping":0"#), "multicast snooping is on: {details}");
        let lo = nl.link_index("lo").unwrap().unwrap();
        assert!(!nl.link_is_bridge(lo).unwrap());
        let err = nl.create_bridge("wsbr-t", mac).unwrap_err();
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
        client_isolation: false,
        egress: None,
        ipv6_ports: None,
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
        firewall::remove(t, false).unwrap(); // absent table: fine

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

        // The bridge family twin (adopted bridges): IPv6 from the clients' ports to the host.
        firewall::apply(&NatRules { ipv6_ports: Some("wsn"), ..rules(t, "eth8", false, true) }).unwrap();
        let listing = run(&["nft", "list", "table", "bridge", t]);
        assert!(listing.contains(r#"iifname "wsn*" ether type ip6 drop"#), "{listing}");
        firewall::remove(t, true).unwrap();
        assert!(!run(&["nft", "list", "tables"]).contains(t));

        firewall::remove(t, false).unwrap();
        firewall::remove(t, true).unwrap();
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

#[test]
fn firewall_egress_policy_rules() {
    if !has_nft() {
        return;
    }
    in_netns(|| {
        let t = "wsnic_e";
        let allow = [(Ipv4Addr::new(192, 168, 1, 0), 24), (Ipv4Addr::new(10, 1, 2, 3), 32)];
        // Overlapping and host-bit entries are fine: nft merges anonymous interval sets.
        let deny = [(Ipv4Addr::new(203, 0, 113, 9), 24), (Ipv4Addr::new(203, 0, 113, 128), 25)];
        let mut r = rules(t, "eth9", true, true);
        r.egress = Some(Egress { gateway: Ipv4Addr::new(10, 0, 2, 1), allow: &allow, deny: &deny });
        firewall::apply(&r).unwrap();
        let listing = run(&["nft", "list", "table", "ip", t]);
        let input = listing.split("chain input {").nth(1).expect(&listing).split("chain forward").next().unwrap();
        for rule in [
            "type filter hook input priority filter; policy accept;",
            r#"iifname "wsbr0" ct state established,related accept"#,
            r#"iifname "wsbr0" ip daddr 10.0.2.1 udp dport { 53, 67 } accept"#,
            r#"iifname "wsbr0" ip daddr 10.0.2.1 tcp dport 53 accept"#,
            r#"iifname "wsbr0" ip daddr 10.0.2.1 ip protocol icmp accept"#,
            r#"iifname "wsbr0" ip daddr { 10.1.2.3, 192.168.1.0/24 } accept"#,
            r#"iifname "wsbr0" drop"#,
        ] {
            assert!(input.contains(rule), "{rule} missing:\n{listing}");
        }
        let forward: Vec<&str> = listing.split("chain forward {").nth(1).unwrap().lines().map(str::trim).collect();
        let expected = [
            "type filter hook forward priority filter; policy accept;",
            r#"iifname "wsbr0" ct state established,related accept"#,
            r#"iifname "wsbr0" oifname "wsbr0" accept"#,
            r#"iifname "wsbr0" ip daddr { 10.1.2.3, 192.168.1.0/24 } accept"#,
            r#"iifname "wsbr0" ip daddr { 203.0.113.0/24 } drop"#,
            r#"iifname "wsbr0" ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } drop"#,
            r#"iifname "wsbr0" oifname "eth9" accept"#,
            r#"iifname "eth9" oifname "wsbr0" ct state established,related accept"#,
            r#"iifname "eth9" oifname "wsbr0" drop"#,
            r#"iifname "wsbr0" drop"#,
        ];
        assert_eq!(&forward[1..=expected.len()], expected, "{listing}");
        assert!(!listing.contains("policy drop"), "{listing}");

        // Re-applying replaces the rules; empty lists leave their rules out.
        r.egress = Some(Egress { gateway: Ipv4Addr::new(10, 0, 2, 1), allow: &[], deny: &[] });
        r.client_isolation = true;
        firewall::apply(&r).unwrap();
        let listing = run(&["nft", "list", "table", "ip", t]);
        assert!(!listing.contains("10.1.2.3") && !listing.contains("203.0.113"), "{listing}");
        assert!(!listing.contains(r#"oifname "wsbr0" accept"#), "{listing}");
        let forward = listing.split("chain forward {").nth(1).unwrap();
        assert_eq!(forward.lines().nth(2).unwrap().trim(), r#"iifname "wsbr0" oifname "wsbr0" drop"#, "{listing}");

        // Without the policy the table is as before: no input chain.
        r.egress = None;
        r.client_isolation = false;
        firewall::apply(&r).unwrap();
        let listing = run(&["nft", "list", "table", "ip", t]);
        assert!(!listing.contains("chain input") && !listing.contains(r#"iifname "wsbr0" drop"#), "{listing}");
        firewall::remove(t, false).unwrap();
        assert!(!firewall::table_exists(t).unwrap());
    });
}

/// A network namespace of its own, held by a `sleep` started with `unshare -n` from the calling
/// thread's namespace; commands run in it through `nsenter`. Killing the `sleep` (on drop) frees it.
struct Peer {
    holder: Child,
}

impl Peer {
    fn new() -> Peer {
        let holder = Command::new("unshare").args(["-n", "sleep", "300"]).stdin(Stdio::null()).spawn().unwrap();
        let peer = Peer { holder };
        let mine = netns_inode();
        let path = format!("/proc/{}/ns/net", peer.pid());
        for _ in 0..500 {
            if std::fs::read_link(&path).is_ok_and(|l| l.to_string_lossy() != mine) {
                peer.ok(&["ip", "link", "set", "lo", "up"]);
                return peer;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("unshare -n did not move to a new namespace");
    }

    fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter").args(["-t", &self.pid(), "-n", "--"]).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A veth pair: `here` in the calling thread's namespace (down), `there` in this one.
    fn veth(&self, here: &str, there: &str) {
        run(&["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", &self.pid()]);
        self.ok(&["ip", "link", "set", there, "up"]);
    }

    fn ping(&self, to: &str) -> bool {
        self.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", to]).status.success()
    }

    /// A ping expected to pass: three tries (the first may wait for ARP or DAD).
    fn reaches(&self, to: &str) -> bool {
        (0..3).any(|_| self.ping(to))
    }

    /// Whether a TCP connection to `to:port` is established within 2 s.
    fn tcp(&self, to: &str, port: u16) -> bool {
        let script = format!("exec 3<>/dev/tcp/{to}/{port}");
        self.exec(&["timeout", "2", "bash", "-c", &script]).status.success()
    }

    /// Send one UDP datagram to `to:port`.
    fn udp(&self, to: &str, port: u16) {
        let script = format!("echo hi >/dev/udp/{to}/{port}");
        self.ok(&["bash", "-c", &script]);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A client namespace on bridge `br`: veth `host_end` (a port of `br`) ↔ `eth0` with `addr`/24
/// and a default route via `gw`.
fn client(nl: &mut Netlink, br: u32, host_end: &str, addr: &str, gw: &str) -> Peer {
    let c = Peer::new();
    c.veth(host_end, "eth0");
    c.ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    c.ok(&["ip", "route", "add", "default", "via", gw]);
    let port = nl.link_index(host_end).unwrap().unwrap();
    nl.attach_up(port, br).unwrap();
    c
}

fn bridge_with_addr(nl: &mut Netlink, name: &str, cidr: &str) -> u32 {
    let br = nl.create_bridge(name, wsnic::sys::stable_mac(name)).unwrap();
    run(&["ip", "addr", "add", cidr, "dev", name]);
    nl.set_up(br).unwrap();
    br
}

#[test]
fn bridge_port_isolation() {
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, "wsbr-i", "192.168.7.1/24");
        let c1 = client(&mut nl, br, "wsp1", "192.168.7.11", "192.168.7.1");
        let c2 = client(&mut nl, br, "wsp2", "192.168.7.12", "192.168.7.1");
        let (p1, p2) = (nl.link_index("wsp1").unwrap().unwrap(), nl.link_index("wsp2").unwrap().unwrap());
        assert!(!nl.port_isolated(p1).unwrap());
        assert!(c1.reaches("192.168.7.12"), "ports are not isolated yet");

        for p in [p1, p2] {
            nl.set_port_isolated(p, true).unwrap();
            assert!(nl.port_isolated(p).unwrap());
        }
        let shown = run(&["bridge", "-d", "link", "show", "dev", "wsp1"]);
        assert!(shown.contains("isolated on"), "{shown}");
        run(&["ip", "neigh", "flush", "dev", "wsbr-i"]);
        c1.ok(&["ip", "neigh", "flush", "dev", "eth0"]);
        c2.ok(&["ip", "neigh", "flush", "dev", "eth0"]);
        assert!(c1.reaches("192.168.7.1") && c2.reaches("192.168.7.1"), "isolated ports reach the bridge");
        assert!(!c1.ping("192.168.7.12") && !c2.ping("192.168.7.11"), "isolated ports reached each other");

        // One port back to normal: an isolated port reaches a non-isolated one.
        nl.set_port_isolated(p2, false).unwrap();
        assert!(!nl.port_isolated(p2).unwrap());
        let shown = run(&["bridge", "-d", "link", "show", "dev", "wsp2"]);
        assert!(shown.contains("isolated off"), "{shown}");
        assert!(c1.reaches("192.168.7.12"));

        // attach_isolated_up: enslaved, isolated and up.
        let c3 = Peer::new();
        c3.veth("wsp3", "eth0");
        c3.ok(&["ip", "addr", "add", "192.168.7.13/24", "dev", "eth0"]);
        let p3 = nl.link_index("wsp3").unwrap().unwrap();
        nl.attach_isolated_up(p3, br).unwrap();
        assert!(nl.port_isolated(p3).unwrap());
        let link = run(&["ip", "-d", "-j", "link", "show", "dev", "wsp3"]);
        assert!(link.contains(r#""master":"wsbr-i""#) && link.contains(r#""UP""#), "{link}");
        assert!(link.contains(r#""isolated":true"#), "{link}");
        assert!(c3.reaches("192.168.7.1") && c3.reaches("192.168.7.12"));
        assert!(!c3.ping("192.168.7.11"));

        // Not a bridge port, or no such link: errors, not a silent no-op.
        let lo = nl.link_index("lo").unwrap().unwrap();
        assert!(nl.set_port_isolated(lo, true).unwrap_err().raw_os_error().is_some());
        assert_eq!(nl.port_isolated(lo).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(nl.port_isolated(999_999).unwrap_err().raw_os_error(), Some(libc::ENODEV));
        assert!(nl.set_port_isolated(999_999, true).unwrap_err().raw_os_error().is_some());
    });
}

/// The egress policy and client isolation with real traffic:
/// ```text
///  client c1 192.168.2.11 ─┐
///                          ├─ wsbr0 192.168.2.1 ─ (this namespace, 198.51.100.2) ─ wsup0 ═ uplink peer
///  client c2 192.168.2.12 ─┘                198.51.100.1, 10.1.2.3, 169.254.169.254, 203.0.113.7
/// ```
#[test]
fn egress_policy_and_isolation_traffic() {
    if !has_nft() {
        return;
    }
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, BRIDGE, "192.168.2.1/24");
        let c1 = client(&mut nl, br, "wsc1", "192.168.2.11", "192.168.2.1");
        let c2 = client(&mut nl, br, "wsc2", "192.168.2.12", "192.168.2.1");
        let up = Peer::new();
        up.veth("wsup0", "eth0");
        for a in ["198.51.100.1/24", "10.1.2.3/32", "169.254.169.254/32", "203.0.113.7/32"] {
            up.ok(&["ip", "addr", "add", a, "dev", "eth0"]);
        }
        run(&["ip", "addr", "add", "198.51.100.2/24", "dev", "wsup0"]);
        run(&["ip", "link", "set", "wsup0", "up"]);
        run(&["ip", "route", "add", "default", "via", "198.51.100.1"]);
        sysctl::write("net.ipv4.ip_forward", "1").unwrap();
        // No redirects: a client routing to another through the gateway stays routed.
        sysctl::write("net.ipv4.conf.all.send_redirects", "0").unwrap();
        sysctl::write(&format!("net.ipv4.conf.{BRIDGE}.send_redirects"), "0").unwrap();
        // Host services on the gateway address: DNS (allowed) and something else (not).
        let _dns_tcp = TcpListener::bind("192.168.2.1:53").unwrap();
        let _other_tcp = TcpListener::bind("192.168.2.1:8070").unwrap();
        let _uplink_tcp = TcpListener::bind("198.51.100.2:8070").unwrap();
        let dns_udp = UdpSocket::bind("192.168.2.1:53").unwrap();
        let other_udp = UdpSocket::bind("192.168.2.1:5353").unwrap();
        for s in [&dns_udp, &other_udp] {
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        }
        let received = |s: &UdpSocket| s.recv(&mut [0; 64]).is_ok();

        let t = "wsnic_tr";
        let mut r = rules(t, "wsup0", true, true);
        r.subnet = Ipv4Addr::new(192, 168, 2, 0);
        firewall::apply(&r).unwrap();
        // Without the policy everything is reachable (the baseline the checks below rely on).
        for to in ["198.51.100.1", "10.1.2.3", "169.254.169.254", "198.51.100.2", "192.168.2.1", "192.168.2.12"] {
            assert!(c1.reaches(to), "baseline: {to}");
        }
        assert!(c1.tcp("192.168.2.1", 8070) && c1.tcp("198.51.100.2", 8070));

        let gw = Ipv4Addr::new(192, 168, 2, 1);
        r.egress = Some(Egress { gateway: gw, allow: &[], deny: &[] });
        firewall::apply(&r).unwrap();
        assert!(c1.reaches("198.51.100.1"), "Internet-bound traffic passes");
        assert!(c1.reaches("203.0.113.7"));
        assert!(c1.reaches("192.168.2.1"), "ICMP to the gateway");
        assert!(c1.reaches("192.168.2.12"), "clients on the bridge reach each other (br_netfilter or not)");
        assert!(!c1.ping("10.1.2.3"), "RFC 1918 behind the uplink");
        assert!(!c1.ping("198.51.100.2"), "the host's uplink address");
        assert!(!c1.ping("169.254.169.254"), "metadata address behind the uplink");
        assert!(c1.tcp("192.168.2.1", 53), "DNS over TCP to the gateway");
        assert!(!c1.tcp("192.168.2.1", 8070), "another TCP port of the gateway");
        assert!(!c1.tcp("198.51.100.2", 8070), "a TCP port on another host address");
        c1.udp("192.168.2.1", 53);
        assert!(received(&dns_udp), "DNS over UDP to the gateway");
        c1.udp("192.168.2.1", 5353);
        assert!(!received(&other_udp), "another UDP port of the gateway");
        // The host still reaches clients, and the uplink side gets replies only.
        assert!(run(&["ping", "-c", "1", "-W", "1", "192.168.2.11"]).contains("1 received"));
        assert!(!up.ping("192.168.2.11"), "restrict_inbound");

        // allow opens holes (forwarded and to the host), deny closes one.
        let allow = [(Ipv4Addr::new(10, 1, 2, 3), 32), (Ipv4Addr::new(198, 51, 100, 2), 32)];
        let deny = [(Ipv4Addr::new(203, 0, 113, 0), 24)];
        r.egress = Some(Egress { gateway: gw, allow: &allow, deny: &deny });
        firewall::apply(&r).unwrap();
        assert!(c1.reaches("10.1.2.3"), "egress allow, forwarded");
        assert!(c1.reaches("198.51.100.2"), "egress allow, to the host");
        assert!(c1.tcp("198.51.100.2", 8070), "egress allow, TCP to the host");
        assert!(!c1.ping("203.0.113.7"), "egress deny");
        assert!(c1.reaches("198.51.100.1"));

        // Client isolation: the bridge ports, and routing through the gateway.
        for p in ["wsc1", "wsc2"] {
            let index = nl.link_index(p).unwrap().unwrap();
            nl.set_port_isolated(index, true).unwrap();
        }
        for (c, other) in [(&c1, "192.168.2.12"), (&c2, "192.168.2.11")] {
            c.ok(&["ip", "neigh", "flush", "dev", "eth0"]);
            c.ok(&["ip", "route", "add", &format!("{other}/32"), "via", "192.168.2.1"]);
        }
        r.egress = None;
        firewall::apply(&r).unwrap();
        assert!(c1.reaches("192.168.2.12"), "without the rule, isolated clients meet through the gateway");
        r.client_isolation = true;
        firewall::apply(&r).unwrap();
        assert!(!c1.ping("192.168.2.12") && !c2.ping("192.168.2.11"), "routed around port isolation");
        assert!(c1.reaches("192.168.2.1") && c1.reaches("198.51.100.1"));
        r.egress = Some(Egress { gateway: gw, allow: &[], deny: &[] });
        firewall::apply(&r).unwrap();
        assert!(!c1.ping("192.168.2.12"), "routed around port isolation, egress policy on");
        assert!(c1.reaches("192.168.2.1") && c1.reaches("198.51.100.1"));
    });
}

/// A TAP with a NAPI thread and a nearly full send buffer: `write` returns `WouldBlock` while the
/// thread is behind, and then the fd turns writable (an edge-triggered epoll wake-up) — every
/// time. `tun` loses that wake-up unless the file is polled after the failed write, which
/// `Tap::write` does; without it this test stalls at the first `WouldBlock`.
#[test]
fn a_napi_tap_with_a_full_send_buffer_wakes_its_writer() {
    use mio::{unix::SourceFd, Events, Interest, Poll, Token};
    use wsnic::sys::tap::Tap;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        bridge_with_addr(&mut nl, "tbr0", "10.77.0.1/24");
        let tap = Tap::open("tnapi%d", false, true).unwrap();
        let name = tap.name().to_string();
        run(&["ip", "link", "set", &name, "master", "tbr0", "up"]);
        // The thread: through a sysfs of this namespace, mounted by a child of its own.
        let script = format!("mount -t sysfs sysfs /sys && echo 1 > /sys/class/net/{name}/threaded");
        run(&["unshare", "-m", "sh", "-c", &script]);
        // Room for about five small frames in flight.
        tap.set_send_buffer(4096).unwrap();
        let mut poll = Poll::new().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
        poll.registry().register(&mut SourceFd(&fd), Token(0), Interest::WRITABLE).unwrap();
        let mut events = Events::with_capacity(4);
        // The event registration itself reports: take it now, so each wait below is a wake-up.
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        // Broadcast, of an EtherType nobody handles: the bridge takes it and the host drops it.
        let mut frame = [0u8; 64];
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        let (mut sent, mut blocked) = (0u64, 0u64);
        while sent < 20_000 {
            match tap.write(&frame) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
                    assert!(!events.is_empty(), "no wake-up within 5 s after {sent} frames ({blocked} waits)");
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(blocked > 0, "the send buffer never filled, so nothing was tested");
        // The bridge's own counter: frames that went all the way through it to the host (the
        // TAP's counts a frame when it is queued to the NAPI thread).
        let rx = || {
            let j = run(&["ip", "-s", "-j", "link", "show", "tbr0"]);
            j.split("\"rx\":{\"bytes\":")
                .nth(1)
                .and_then(|r| r.split("\"packets\":").nth(1))
                .map(|p| p.split([',', '}']).next().unwrap().parse::<u64>().unwrap())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rx() != Some(sent) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(rx(), Some(sent), "frames written but never taken by the kernel ({blocked} waits)");
    });
}

/// The reaper counts the TAPs it has been handed until each is a spare or deleted (the event
/// loop stops accepting while that backlog is full): back to exactly zero once it is done, with
/// `keep` spares left on the bridge with their ports disabled and every other device gone.
#[test]
fn the_reapers_backlog_counts_every_tap_until_it_is_kept_or_deleted() {
    use wsnic::relay::reaper::Reaper;
    use wsnic::sys::tap::Tap;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, "tbr0", "10.78.0.1/24");
        let reaper = Reaper::start(br, 4, Duration::from_secs(60)).unwrap();
        assert_eq!(reaper.backlog(), 0);
        let taps: Vec<Tap> = (0..200).map(|_| port_tap(&mut nl, br)).collect();
        // A MAC the bridge learned behind each port (the client's): gone once it is a spare.
        for (i, t) in taps.iter().enumerate() {
            let mac = format!("02:77:00:00:00:{i:02x}");
            run(&["bridge", "fdb", "add", &mac, "dev", t.name(), "master", "dynamic"]);
            assert!(run(&["bridge", "fdb", "show", "dev", t.name()]).contains(&mac));
        }
        let mut most = 0;
        for t in taps {
            reaper.reap(t);
            most = most.max(reaper.backlog());
        }
        assert!((1..=200).contains(&most), "backlog seen while reaping: {most}");
        let names = settled_taps(&reaper);
        assert_eq!(names.len(), 4, "only the spares remain: {names:?}");
        for n in &names {
            let l = run(&["bridge", "link", "show", "dev", n]);
            assert!(l.contains("master tbr0") && l.contains("state disabled"), "a spare's port forwards nothing: {l}");
            let fdb = run(&["bridge", "fdb", "show", "dev", n]);
            assert!(!fdb.contains("02:77:00:00:00:"), "a spare keeps no MAC learned on it: {fdb}");
        }
        let spares: Vec<Tap> = std::iter::from_fn(|| reaper.spare()).collect();
        assert_eq!(spares.len(), 4);
        assert_eq!(reaper.backlog(), 0, "a spare taken is not waiting for the reaper");
        drop(spares);
    });
}

/// A TAP named `trp…`, attached to bridge `br` and up.
fn port_tap(nl: &mut Netlink, br: u32) -> wsnic::sys::tap::Tap {
    let t = wsnic::sys::tap::Tap::open("trp%d", false, false).unwrap();
    nl.attach_up(t.index(), br).unwrap();
    t
}

/// Wait (up to 20 s) until the reaper holds nothing it was handed; the `trp` devices left.
fn settled_taps(reaper: &wsnic::relay::reaper::Reaper) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reaper.backlog() != 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(reaper.backlog(), 0, "TAPs still counted as waiting for the reaper");
    let left = run(&["ip", "-o", "link", "show"]);
    left.lines().filter_map(|l| l.split(": ").nth(1)).filter(|n| n.starts_with("trp")).map(str::to_owned).collect()
}

/// A TAP handed over with `discard` (a spare whose port would not forward again, a new TAP
/// whose setup failed) is deleted even when there is room for spares; `reap` would keep it.
#[test]
fn a_discarded_tap_is_deleted_never_kept() {
    use wsnic::relay::reaper::Reaper;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, "tbr0", "10.79.0.1/24");
        let reaper = Reaper::start(br, 4, Duration::from_secs(60)).unwrap();
        let (a, b) = (port_tap(&mut nl, br), port_tap(&mut nl, br));
        reaper.reap(a);
        assert_eq!(settled_taps(&reaper).len(), 2, "a reaped TAP is kept, b is open");
        let spare = reaper.spare().expect("the reaped TAP, kept as a spare");
        reaper.discard(spare);
        reaper.discard(b);
        assert_eq!(settled_taps(&reaper), Vec::<String>::new(), "discarded TAPs are deleted");
        assert!(reaper.spare().is_none(), "and none is kept");
    });
}

/// `set_keep` (a reload that changes `max_clients`) bounds the spares kept from then on.
#[test]
fn the_spare_limit_can_change() {
    use wsnic::relay::reaper::Reaper;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, "tbr0", "10.81.0.1/24");
        let reaper = Reaper::start(br, 4, Duration::from_secs(60)).unwrap();
        reaper.set_keep(1);
        for _ in 0..3 {
            let t = port_tap(&mut nl, br);
            reaper.reap(t);
        }
        assert_eq!(settled_taps(&reaper).len(), 1, "one spare kept, two deleted");
        reaper.set_keep(3);
        for _ in 0..3 {
            let t = port_tap(&mut nl, br);
            reaper.reap(t);
        }
        assert_eq!(settled_taps(&reaper).len(), 3, "up to three now");
    });
}

/// On a bridge that runs the kernel's STP (an adopted one can), the kernel refuses to set a
/// port's state, so a finished TAP cannot be made a spare: every one is deleted, and the
/// backlog still returns to zero.
#[test]
fn on_a_bridge_running_stp_every_finished_tap_is_deleted() {
    use wsnic::relay::reaper::Reaper;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let br = bridge_with_addr(&mut nl, "tbr0", "10.80.0.1/24");
        run(&["ip", "link", "set", "tbr0", "type", "bridge", "stp_state", "1"]);
        assert!(run(&["ip", "-d", "link", "show", "tbr0"]).contains("stp_state 1"), "STP on");
        let reaper = Reaper::start(br, 4, Duration::from_secs(60)).unwrap();
        for _ in 0..3 {
            reaper.reap(port_tap(&mut nl, br));
        }
        assert_eq!(settled_taps(&reaper), Vec::<String>::new(), "no spare kept under STP");
        assert!(reaper.spare().is_none());
    });
}

/// A bridge that snoops multicast keeps the groups a port joined when the port is disabled, so
/// the reaper keeps no spare on it, and keeps spares again once snooping is off.
#[test]
fn no_spare_is_kept_while_the_bridge_snoops_multicast() {
    use wsnic::relay::reaper::Reaper;
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        run(&["ip", "link", "add", "tbr0", "type", "bridge", "mcast_snooping", "1"]);
        run(&["ip", "link", "set", "tbr0", "up"]);
        let br = nl.link_index("tbr0").unwrap().unwrap();
        assert!(nl.bridge_snooping(br).unwrap());
        let reaper = Reaper::start(br, 4, Duration::from_secs(60)).unwrap();
        reaper.reap(port_tap(&mut nl, br));
        reaper.reap(port_tap(&mut nl, br));
        assert_eq!(settled_taps(&reaper), Vec::<String>::new(), "no spare kept while the bridge snoops");
        run(&["ip", "link", "set", "tbr0", "type", "bridge", "mcast_snooping", "0"]);
        assert!(!nl.bridge_snooping(br).unwrap());
        thread::sleep(Duration::from_millis(1100)); // the reaper asks at most once a second
        reaper.reap(port_tap(&mut nl, br));
        assert_eq!(settled_taps(&reaper).len(), 1, "kept once snooping is off");
        assert!(reaper.spare().is_some());
    });
}
