//! The relay core end to end: a real wsnic process in its own network namespace, real
//! TAP devices on a real bridge, real nftables, and WebSocket clients from an independent
//! implementation (tungstenite) or hand-written bytes where a library would refuse.

mod support;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use support::frames::{self, mac};
use support::{client_frame, eventually, raw_ws, read_frame, Guest, Netns, Wsnic};
use tungstenite::Message;

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);
const SEC: Duration = Duration::from_secs(1);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 2, last)
}

/// `count` frames of 1400 bytes from `g` to `dst`, of a local experimental EtherType (the
/// host drops them), written in bursts of 100 without reading anything back.
fn flood(g: &mut Guest, dst: [u8; 6], count: usize) {
    let mut f = vec![0u8; 1400];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&g.mac);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    let burst: Vec<u8> = client_frame(2, &f).repeat(100);
    for _ in 0..count / 100 {
        g.ws.get_mut().write_all(&burst).unwrap();
    }
}

fn http(ns: &Netns, request: &[u8]) -> String {
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn handshakes_accepted_and_refused() {
    let ns = Netns::new("hs");
    let mut w = Wsnic::start(&ns, &[]);

    let plain = http(&ns, b"GET /some/page HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 426 "), "{plain}");
    assert!(plain.contains("wsnic") && plain.contains("WebSocket upgrade"), "{plain}");

    let v8 = http(&ns, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
    assert!(v8.starts_with("HTTP/1.1 426 ") && v8.contains("Sec-WebSocket-Version: 13"), "{v8}");
    let nokey = http(
        &ns,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(nokey.starts_with("HTTP/1.1 400 "), "{nokey}");
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    assert!(http(&ns, huge.as_bytes()).starts_with("HTTP/1.1 400 "));
    let garbage = http(&ns, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    assert!(ns.bridge_ports("wsnicbr0").is_empty(), "a refused handshake made a TAP");

    // Any path, an offered subprotocol is named back, and a TAP appears on the bridge.
    let stream = ns.tcp("127.0.0.1:8070");
    let req = tungstenite::handshake::client::Request::builder()
        .uri("ws://127.0.0.1:8070/some/path?x=1")
        .header("Host", "127.0.0.1:8070")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
        .header("Sec-WebSocket-Protocol", "binary")
        .body(())
        .unwrap();
    // tungstenite, like a browser, insists that an offered protocol be named back.
    let (ws, resp) = tungstenite::client(req, stream).expect("a client offering a subprotocol connects");
    assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap()), Some("binary"));
    drop(ws);
    // That connection got a TAP; the reaper thread removes it shortly after it ended.
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").is_empty()), "{:?}", ns.bridge_ports("wsnicbr0"));

    let mut g = Guest::connect(&ns, mac(1), Ipv4Addr::UNSPECIFIED);
    w.wait_log("connected on wsnic0", 5 * SEC);
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0") == ["wsnic0"]), "{:?}", ns.bridge_ports("wsnicbr0"));
    let up = ns.ip(&["-o", "link", "show", "wsnic0"]);
    assert!(up.contains(",UP"), "{up}");
    // No IPv6 of the host's own on the port: no DAD, MLD or router solicitation to the client.
    let details = ns.ip(&["-d", "link", "show", "wsnic0"]);
    assert!(details.contains("addrgenmode none"), "{details}");
    let v6 = ns.ip(&["-6", "addr", "show", "dev", "wsnic0"]);
    assert!(!v6.contains("inet6"), "{v6}");
    g.ws.close(None).unwrap();
    while g.ws.read().is_ok() {}
    assert!(eventually(5 * SEC, || !ns.link_exists("wsnic0")), "TAP left behind after disconnect");
    w.wait_log("disconnected after", 5 * SEC);
}

#[test]
fn handshake_timeout_drops_silent_connection() {
    let ns = Netns::new("hto");
    let _w = Wsnic::start(&ns, &["--handshake-timeout", "1s"]);
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(10 * SEC)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    assert!(t.elapsed() < 8 * SEC);
}

#[test]
fn arp_and_ping_to_the_gateway() {
    let ns = Netns::new("gw");
    let _w = Wsnic::start(&ns, &[]);
    let mut g = Guest::connect(&ns, mac(10), ip(10));
    let gw_mac = g.arp(GW);
    let bridge_mac = ns.ip(&["-o", "link", "show", "wsnicbr0"]);
    let shown = gw_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    assert!(bridge_mac.contains(&shown), "ARP reply {shown} is not the bridge's MAC: {bridge_mac}");

    for seq in 1..=3 {
        g.send(frames::icmp_echo(8, g.mac, gw_mac, g.ip, GW, 7, seq, b"wsnic-test"));
        let r = g.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip(10), 0, 7, seq)));
        assert!(r.is_some(), "no echo reply {seq} from the gateway");
    }
}

#[test]
fn two_clients_reach_each_other() {
    let ns = Netns::new("two");
    let _w = Wsnic::start(&ns, &[]);
    let mut a = Guest::connect(&ns, mac(11), ip(11));
    let b = Guest::connect(&ns, mac(12), ip(12));
    // B answers ARP and ping on its own thread, as a guest kernel would.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let responder = std::thread::spawn(move || {
        let mut b = b;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            b.recv_until(Duration::from_millis(100), |_| false);
        }
    });
    let b_mac = a.arp(ip(12));
    assert_eq!(b_mac, mac(12));
    a.send(frames::icmp_echo(8, a.mac, b_mac, a.ip, ip(12), 9, 1, b"hello b"));
    assert!(a.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((ip(12), ip(11), 0, 9, 1))).is_some());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
}

/// The original registered the TAP with epoll before TUNSETIFF and so sat on frames for a
/// client that had not spoken. Here the client never sends anything.
#[test]
fn silent_client_receives_frames_at_once() {
    let ns = Netns::new("silent");
    let mut w = Wsnic::start(&ns, &[]);
    let mut g = Guest::connect(&ns, mac(50), Ipv4Addr::UNSPECIFIED);
    w.wait_log("connected on", 5 * SEC);
    // The bridge has carrier once its first port is up (the kernel notices within a second).
    assert!(eventually(5 * SEC, || ns.ip(&["link", "show", "wsnicbr0"]).contains("state UP")));
    ns.ip(&["neigh", "replace", "192.168.2.50", "lladdr", "02:00:5e:00:00:32", "dev", "wsnicbr0", "nud", "permanent"]);
    let pinger = ns
        .cmd("ping")
        .args(["-c", "5", "-i", "0.2", "-W", "1", "192.168.2.50"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 5 && start.elapsed() < 10 * SEC {
        if let Some(f) = g.recv_until(SEC, |f| matches!(frames::icmp_of(f), Some((_, d, 8, _, _)) if d == ip(50))) {
            seen.push((frames::icmp_of(&f).unwrap().4, start.elapsed()));
        }
    }
    let _ = pinger.wait_with_output();
    assert_eq!(seen.len(), 5, "echo requests that reached the silent client: {seen:?}");
    // ping sends every 200 ms: five requests arriving over ~0.8 s means none waited.
    let spread = seen[4].1 - seen[0].1;
    assert!(spread < 3 * SEC, "{seen:?}");
}

#[test]
fn ping_through_nat_to_the_uplink() {
    let relay = Netns::new("nat");
    let up = Netns::new("upl");
    relay.veth("uplink0", &up, "peer0");
    relay.ip(&["addr", "add", "198.51.100.2/24", "dev", "uplink0"]);
    relay.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    up.ip(&["addr", "add", "198.51.100.1/24", "dev", "peer0"]);
    // Count echo requests on the uplink peer by their source address. The peer has no route
    // back to 192.168.2.0/24, so a reply proves the source was rewritten.
    up.nft(
        "table ip count {
            chain input {
                type filter hook input priority 0;
                ip saddr 198.51.100.2 icmp type echo-request counter
                ip saddr 192.168.2.0/24 counter
            }
        }",
    );
    let mut w = Wsnic::start(&relay, &[]);
    w.wait_log("uplink uplink0, NAT on", 5 * SEC);
    let mut g = Guest::connect(&relay, mac(20), ip(20));
    let gw_mac = g.arp(GW);
    let far = Ipv4Addr::new(198, 51, 100, 1);
    for seq in 1..=3 {
        g.send(frames::icmp_echo(8, g.mac, gw_mac, g.ip, far, 3, seq, b"through nat"));
        assert!(
            g.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((far, ip(20), 0, 3, seq))).is_some(),
            "no reply {seq} through NAT"
        );
    }
    let counters = String::from_utf8_lossy(&up.exec("nft", &["list", "table", "ip", "count"]).stdout).into_owned();
    assert!(counters.contains("icmp type echo-request counter packets 3"), "{counters}");
    assert!(counters.contains("ip saddr 192.168.2.0/24 counter packets 0"), "{counters}");
}

#[test]
fn sigterm_restores_everything() {
    let ns = Netns::new("term");
    ns.set_sysctl("net.ipv4.ip_forward", "0");
    let w = Wsnic::start(&ns, &[]);
    let _g = Guest::connect(&ns, mac(30), ip(30));
    assert!(eventually(5 * SEC, || ns.link_exists("wsnic0")));
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1");
    assert!(ns.nft_tables().contains("wsnic_wsnicbr0"));
    assert_eq!(w.stop(), 0);
    assert!(!ns.link_exists("wsnicbr0") && !ns.link_exists("wsnic0"));
    assert!(!ns.nft_tables().contains("wsnic"), "{}", ns.nft_tables());
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0");
}

/// Switching `ip_forward` on and off again changes more than it (the kernel sets
/// `conf.all.accept_redirects` to its opposite and every interface's `forwarding` to it):
/// those are put back too.
#[test]
fn sigterm_restores_what_ip_forward_changed_besides() {
    let ns = Netns::new("fwd");
    ns.set_sysctl("net.ipv4.ip_forward", "0");
    ns.set_sysctl("net.ipv4.conf.all.accept_redirects", "0"); // a hardened host
    ns.ip(&["link", "add", "fwd0", "type", "veth", "peer", "name", "fwd1"]);
    ns.set_sysctl("net.ipv4.conf.fwd0.forwarding", "1"); // forwarding on one interface only
    let w = Wsnic::start(&ns, &[]);
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(w.stop(), 0);
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0");
    assert_eq!(ns.sysctl("net.ipv4.conf.all.accept_redirects"), "0");
    assert_eq!(ns.sysctl("net.ipv4.conf.fwd0.forwarding"), "1");
    assert_eq!(ns.sysctl("net.ipv4.conf.fwd1.forwarding"), "0");
    assert_eq!(ns.sysctl("net.ipv4.conf.default.forwarding"), "0");
}

/// Two instances in one namespace: their bridges, subnets and ports differ.
const BRIDGE_A: &[&str] = &["--bridge-name", "br-a", "--bridge-subnet", "10.9.1.0/24"];
const BRIDGE_B: &[&str] = &["--bridge-name", "br-b", "--bridge-subnet", "10.9.2.0/24", "--ws-server-port", "8071"];

/// Two instances (two bridges): the one that stops last puts back `ip_forward` from before
/// the first, whichever order they stop in.
#[test]
fn two_instances_restore_ip_forward_from_before_the_first() {
    let ns = Netns::new("fwd2");
    for first_stops_first in [true, false] {
        ns.set_sysctl("net.ipv4.ip_forward", "0");
        let a = Wsnic::start(&ns, BRIDGE_A);
        let b = Wsnic::start(&ns, BRIDGE_B);
        let (first, second) = if first_stops_first { (a, b) } else { (b, a) };
        assert_eq!(first.stop(), 0);
        assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1", "the other still forwards");
        assert_eq!(second.stop(), 0);
        assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0", "first_stops_first: {first_stops_first}");
    }
}

/// The same when the first dies (SIGKILL) before the second starts and is restarted while
/// the second runs: its value from before is not lost.
#[test]
fn ip_forward_survives_a_crash_between_two_instances() {
    let ns = Netns::new("fwd3");
    ns.set_sysctl("net.ipv4.ip_forward", "0");
    let mut a = Wsnic::start(&ns, BRIDGE_A);
    a.signal("KILL");
    a.wait_exit();
    let log = a.log.clone();
    drop(a);
    let b = Wsnic::start(&ns, BRIDGE_B);
    let mut a = Wsnic::start_logging(&ns, BRIDGE_A, log);
    a.wait_log("did not exit cleanly", 5 * SEC);
    assert_eq!(a.stop(), 0);
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1", "b still forwards");
    assert_eq!(b.stop(), 0);
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0", "the value from before a");
}

#[test]
fn sigkill_then_restart_repairs() {
    let ns = Netns::new("kill");
    ns.set_sysctl("net.ipv4.ip_forward", "0");
    let mut w = Wsnic::start(&ns, &[]);
    w.signal("KILL");
    w.wait_exit();
    assert!(ns.link_exists("wsnicbr0") && ns.nft_tables().contains("wsnic_wsnicbr0"), "a SIGKILL leaves state behind");
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1");
    let log = w.log.clone();
    drop(w);
    let mut w = Wsnic::start_logging(&ns, &[], log);
    w.wait_log("did not exit cleanly", 5 * SEC);
    let mut g = Guest::connect(&ns, mac(31), ip(31));
    g.arp(GW); // the repaired network works
    assert_eq!(w.stop(), 0);
    assert!(!ns.link_exists("wsnicbr0"));
    assert!(!ns.nft_tables().contains("wsnic"));
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0", "the value from before the crashed run is restored");
}

/// The state file a SIGKILLed run left in /run/wsnic (other tests' runs leave theirs there
/// too: it is found by the dead run's pid).
fn state_file_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_dir("/run/wsnic")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "state")
                && std::fs::read_to_string(p).is_ok_and(|t| t.lines().next() == Some(&format!("pid={pid}")))
        })
        .expect("the killed run's state file")
}

/// Crash repair deletes a bridge the dead run created only if it is still that bridge (it has
/// the MAC wsnic gives its own): one made by someone else since is adopted and left.
#[test]
fn crash_repair_leaves_a_bridge_someone_else_made_since() {
    let ns = Netns::new("kill2");
    let mut w = Wsnic::start(&ns, &[]);
    w.signal("KILL");
    w.wait_exit();
    let log = w.log.clone();
    drop(w);
    ns.ip(&["link", "del", "wsnicbr0"]);
    ns.ip(&["link", "add", "wsnicbr0", "address", "02:aa:bb:cc:dd:ee", "type", "bridge"]);
    let mut w = Wsnic::start_logging(&ns, &[], log);
    w.wait_log("not deleting bridge wsnicbr0", 5 * SEC);
    w.wait_log("adopting existing bridge", 5 * SEC);
    assert_eq!(w.stop(), 0);
    assert!(ns.link_exists("wsnicbr0"), "someone else's bridge was deleted");
}

/// Crash repair knows the bridge a dead run made by the MAC that run recorded, not by one
/// derived again from the machine id (or host name), which may have changed since.
#[test]
fn crash_repair_finds_its_bridge_after_the_machine_id_changed() {
    let ns = Netns::new("kill4");
    let mut w = Wsnic::start(&ns, &[]);
    w.signal("KILL");
    w.wait_exit();
    drop(w);
    let id = std::env::temp_dir().join(format!("{}.machine-id", ns.name));
    std::fs::write(&id, "0123456789abcdef0123456789abcdef\n").unwrap();
    // In `ip netns exec`'s own mount namespace, and a UTS namespace (for a host without a
    // machine id): the next start sees another machine.
    let script = format!(
        "if [ -e /etc/machine-id ]; then mount --bind {} /etc/machine-id || exit 9; fi; \
         exec unshare -u sh -c 'hostname wsnic-test-other-host && exec timeout -s TERM 3 {} -v'",
        id.display(),
        support::BIN
    );
    let out = ns.cmd("sh").args(["-c", &script]).output().unwrap();
    let _ = std::fs::remove_file(&id);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(124), "stopped by timeout's SIGTERM: {log}");
    assert!(log.contains("did not exit cleanly") && log.contains("listening on"), "{log}");
    assert!(!log.contains("not deleting bridge") && !log.contains("adopting"), "{log}");
    assert!(!ns.link_exists("wsnicbr0"), "the dead run's bridge stayed: {log}");
}

/// A state file that cannot be read may stand for state left behind: wsnic says so and does
/// not start over it.
#[test]
fn an_unreadable_state_file_stops_the_start() {
    let ns = Netns::new("kill3");
    let mut w = Wsnic::start(&ns, &[]);
    w.signal("KILL");
    w.wait_exit();
    let state = state_file_of(w.child.id());
    std::fs::write(&state, "garbage\n").unwrap();
    let out = ns.cmd("timeout").args(["10", support::BIN]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_file(&state);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unreadable state file"), "{err}");
    assert!(!state.with_extension("lock").exists(), "a failed start leaves no lock file");
}

/// A start whose state file cannot be written once it has begun changing the network (here
/// /run/wsnic is a tmpfs with room for one file, so the first rewrite fails) stops, and puts
/// back what it had made.
#[test]
fn a_state_file_that_cannot_be_rewritten_stops_the_start_and_leaves_nothing() {
    let ns = Netns::new("nospace");
    ns.set_sysctl("net.ipv4.ip_forward", "0");
    // `ip netns exec` runs it in a mount namespace of its own: the tmpfs is seen only there.
    let script = format!("mkdir -p /run/wsnic && mount -t tmpfs -o size=4k tmpfs /run/wsnic && exec {}", support::BIN);
    let out = ns.cmd("timeout").args(["10", "sh", "-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("state file") && err.contains("No space left"), "{err}");
    assert!(!ns.link_exists("wsnicbr0"), "the bridge stayed");
    assert!(!ns.nft_tables().contains("wsnic"), "{}", ns.nft_tables());
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "0");
}

#[test]
fn existing_bridge_is_adopted_and_left() {
    let ns = Netns::new("adopt");
    ns.ip(&["link", "add", "wsnicbr0", "type", "bridge"]);
    let mut w = Wsnic::start(&ns, &[]);
    w.wait_log("adopting existing bridge", 5 * SEC);
    let mut g = Guest::connect(&ns, mac(32), ip(32));
    g.arp(GW);
    // `ip link add … type bridge` snoops multicast: a finished client's TAP is not kept.
    drop(g);
    w.wait_log("the bridge snoops multicast", 5 * SEC);
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").is_empty()), "the finished client's TAP is gone");
    assert_eq!(w.stop(), 0);
    assert!(ns.link_exists("wsnicbr0"), "someone else's bridge was deleted");
    assert!(!ns.ip(&["addr", "show", "wsnicbr0"]).contains("192.168.2.1"), "our address stayed");
    let link = ns.ip(&["-o", "link", "show", "wsnicbr0"]);
    assert!(!link.contains(",UP") && !link.contains("<UP"), "it was down before the run: {link}");
}

/// On an adopted bridge the gateway address goes with the run that added it, also when that
/// run was killed (the next start repairs), and stays if the bridge had it before.
#[test]
fn an_adopted_bridge_loses_only_the_gateway_address_wsnic_added() {
    let ns = Netns::new("adoptaddr");
    ns.ip(&["link", "add", "wsnicbr0", "type", "bridge"]);
    let has_gw = || ns.ip(&["addr", "show", "dev", "wsnicbr0"]).contains("192.168.2.1/24");
    for had_it in [false, true] {
        if had_it {
            ns.ip(&["addr", "add", "192.168.2.1/24", "dev", "wsnicbr0"]);
        }
        let mut w = Wsnic::start(&ns, &[]);
        w.wait_log("adopting existing bridge", 5 * SEC);
        assert!(has_gw());
        w.signal("KILL");
        w.wait_exit();
        let log = w.log.clone();
        drop(w);
        let mut w = Wsnic::start_logging(&ns, &[], log);
        w.wait_log("did not exit cleanly", 5 * SEC);
        Guest::connect(&ns, mac(38), ip(38)).arp(GW);
        assert_eq!(w.stop(), 0);
        assert_eq!(has_gw(), had_it, "the bridge had the address before: {had_it}");
    }
}

/// An adopted bridge keeps its IPv6 addresses (switching IPv6 off on it would delete them for
/// good), and with the egress policy clients still cannot reach the host over them.
#[test]
fn an_adopted_bridge_keeps_its_ipv6_and_clients_do_not_reach_the_host_over_it() {
    let ns = Netns::new("adopt6");
    ns.ip(&["link", "add", "wsnicbr0", "type", "bridge"]);
    ns.ip(&["link", "set", "wsnicbr0", "up"]);
    ns.ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", "wsnicbr0", "nodad"]);
    let has_v6 = || ns.ip(&["-6", "addr", "show", "dev", "wsnicbr0"]).contains("fd00:1::1/64");
    // ICMPv6 echo requests that reached the namespace's own stack.
    let echos = || -> u64 {
        let text = String::from_utf8_lossy(&ns.exec("cat", &["/proc/net/snmp6"]).stdout).into_owned();
        text.lines().find_map(|l| l.strip_prefix("Icmp6InEchos")).unwrap().trim().parse().unwrap()
    };
    // Without the egress policy the echo reaches the host (the test can see one), with it not.
    for (egress, i) in [("false", 36u8), ("true", 37)] {
        let w = Wsnic::start(&ns, &["--egress-policy", egress]);
        let mut g = Guest::connect(&ns, mac(i), ip(i));
        let gw = g.arp(GW);
        assert!(has_v6(), "the bridge's own IPv6 address was deleted (egress_policy={egress})");
        let before = echos();
        let src: std::net::Ipv6Addr = format!("fd00:1::{i}").parse().unwrap();
        for seq in 0..3 {
            g.send(frames::icmp6_echo(g.mac, gw, src, "fd00:1::1".parse().unwrap(), seq));
        }
        let reached = eventually(2 * SEC, || echos() >= before + 3);
        assert_eq!(reached, egress == "false", "egress_policy={egress}: {} echos reached the host", echos() - before);
        assert_eq!(w.stop(), 0);
        assert!(has_v6(), "gone after the run (egress_policy={egress})");
        assert!(!ns.nft_tables().contains("wsnic"), "{}", ns.nft_tables());
    }
}

/// On an adopted bridge that runs STP the kernel refuses to disable a port, so no finished
/// client's TAP can be kept as a spare: each is deleted, and the log says why once, at info.
#[test]
fn on_an_adopted_bridge_with_stp_finished_taps_are_deleted_and_the_log_says_why() {
    let ns = Netns::new("adoptstp");
    // Snooping off: with it on, the reaper keeps no spare whatever the port state allows.
    ns.ip(&["link", "add", "wsnicbr0", "type", "bridge", "stp_state", "1", "mcast_snooping", "0"]);
    let mut w = Wsnic::start(&ns, &[]);
    w.wait_log("adopting existing bridge", 5 * SEC);
    for i in 0..3 {
        let g = Guest::connect(&ns, mac(33 + i), ip(33 + i));
        drop(g);
        assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").is_empty()), "the finished client's TAP is gone");
    }
    w.wait_log("its bridge port could not be disabled", 5 * SEC);
    let said = w.log_text().matches("could not be disabled").count();
    assert_eq!(said, 1, "said once, not per TAP");
    assert!(w.log_text().contains("while the bridge runs STP"), "{}", w.log_text());
    assert_eq!(w.stop(), 0);
}

/// A client that never reads while its peer floods it: the server stops reading the slow
/// client's TAP (the kernel queue drops) and its memory stays flat.
#[test]
fn slow_reader_does_not_grow_memory() {
    let ns = Netns::new("slow");
    let w = Wsnic::start(&ns, &[]);
    let sleeper = support::raw_ws(&ns);
    let mut g = Guest::connect(&ns, mac(41), ip(41));
    // To mac(40), unknown to the bridge, so flooded to the sleeper.
    flood(&mut g, mac(40), 20_000); // warm up: buffers allocated, socket buffers full
    std::thread::sleep(Duration::from_millis(300));
    let before = w.rss_kib();
    flood(&mut g, mac(40), 100_000); // 140 MB more toward a client that reads nothing
    std::thread::sleep(Duration::from_millis(300));
    let after = w.rss_kib();
    assert!(after < before + 4096, "RSS grew from {before} KiB to {after} KiB");
    // The backpressure is real: the sleeper's TAP (the first one) dropped in the kernel.
    let stats = ns.ip(&["-s", "-j", "link", "show", "wsnic0"]);
    let tx = stats.split("\"tx\":").nth(1).unwrap();
    let dropped: u64 =
        tx.split("\"dropped\":").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
    assert!(dropped > 10_000, "the kernel queue should have dropped most of the flood: {stats}");
    drop(sleeper);
}

#[test]
fn frame_rules_and_control_frames() {
    let ns = Netns::new("frames");
    let mut w = Wsnic::start(&ns, &["--max-frame-size", "1514"]);

    // Ping → pong with the same payload; text is dropped and counted; a runt is dropped.
    let mut g = Guest::connect(&ns, mac(60), ip(60));
    g.ws.send(Message::Ping(b"are you there".to_vec().into())).unwrap();
    g.ws.send(Message::text("text is not a frame")).unwrap();
    g.ws.send(Message::binary(vec![1u8; 10])).unwrap();
    loop {
        match g.ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Message::Binary(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
    // A frame over max_frame_size: close 1009.
    g.ws.send(Message::binary(vec![0u8; 1515])).unwrap();
    assert_eq!(g.close_code(), Some(1009));
    let log = w.wait_log("frame too big", 5 * SEC);
    assert!(log.contains("text 1, runt 1"), "{log}");

    // Unmasked client frame: close 1002.
    let mut s = raw_ws(&ns);
    s.write_all(&[0x82, 0x02, 0xab, 0xcd]).unwrap();
    let (op, payload) = read_frame(&mut s).unwrap();
    assert_eq!((op, u16::from_be_bytes([payload[0], payload[1]])), (8, 1002));

    // Fragmented message: reassembled into one frame (it reaches the gateway as an ARP).
    let mut s = raw_ws(&ns);
    let arp = frames::arp_request(mac(61), ip(61), GW);
    let mut first = client_frame(2, &arp[..20]);
    first[0] &= 0x7f; // FIN clear
    let mut last = client_frame(0, &arp[20..]);
    last[0] |= 0x80;
    // Sent again each second, as a guest's ARP would be: the bridge, whose only port just
    // changed, may lack carrier for a moment.
    s.set_read_timeout(Some(SEC)).unwrap();
    let mut got_pong = false;
    let replied = (0..5).any(|_| {
        s.write_all(&[first.clone(), client_frame(9, b"mid"), last.clone()].concat()).unwrap();
        while let Ok((op, p)) = read_frame(&mut s) {
            got_pong |= op == 0xA && p == b"mid";
            if op == 2 && frames::arp_reply_from(&p, GW).is_some() {
                return true;
            }
        }
        false
    });
    assert!(replied && got_pong);
    s.set_read_timeout(Some(10 * SEC)).unwrap();

    // Close handshake initiated by the client: the server answers with the same code.
    s.write_all(&client_frame(8, &[0x03, 0xe8])).unwrap();
    loop {
        let (op, p) = read_frame(&mut s).unwrap();
        if op == 8 {
            assert_eq!(p, [0x03, 0xe8]);
            break;
        }
    }
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "server closes TCP after the close handshake");
}

#[test]
fn keepalive_pings_then_closes_idle_client() {
    let ns = Netns::new("idle");
    let mut w = Wsnic::start(&ns, &["--ping-interval", "1s", "--idle-timeout", "3s"]);
    let mut s = raw_ws(&ns);
    let t = Instant::now();
    // Skip the frames the kernel sends on its own (IPv6 neighbour discovery, MLD).
    let mut next = || loop {
        match read_frame(&mut s).unwrap() {
            (2, _) => continue,
            f => return f,
        }
    };
    assert_eq!(next().0, 9, "a silent client gets a PING");
    let (op, p) = next();
    assert_eq!((op, u16::from_be_bytes([p[0], p[1]])), (8, 1001), "then a Close (going away)");
    assert!(t.elapsed() >= 2 * SEC, "closed too early: {:?}", t.elapsed());
    w.wait_log("idle for", 5 * SEC);
}

#[test]
fn bad_config_is_refused_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("wsnic-badconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("wsnic.conf");
    std::fs::write(&f, "# comment\nws_server_port=8070\nbridge_subnet=10.1.2.0/31\n").unwrap();
    let out = std::process::Command::new(support::BIN).arg("-c").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3: bridge_subnet:", f.display())), "{err}");

    std::fs::write(&f, "colour=blue\n").unwrap();
    // The default file is wsnic.conf in the working directory.
    let out = std::process::Command::new(support::BIN).current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wsnic.conf:1: colour: unknown key"));

    let out =
        std::process::Command::new(support::BIN).args(["--idle-timeout", "5s"]).current_dir("/").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout: idle_timeout:"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_net_admin_says_so_and_exits_1() {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", support::BIN])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN") && err.lines().count() == 1, "{err}");
}

/// `tcp_congestion` is set on the listener and the clients' connections inherit it; a name
/// the kernel does not have is a configuration error naming the key.
#[test]
fn tcp_congestion_applies_to_the_clients_connections() {
    let ns = Netns::new("cc");
    let out = ns.exec("sysctl", &["-n", "net.ipv4.tcp_congestion_control"]);
    let default = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Not the namespace's own default, or the test could not fail.
    let pick = if default == "reno" { "cubic" } else { "reno" };
    let _w = Wsnic::start(&ns, &["--tcp-congestion", pick]);
    let mut g = Guest::connect(&ns, mac(71), ip(71));
    g.arp(GW);
    // `ss -ti`: each socket's line, then a line of its TCP details, which starts with the
    // congestion control's name.
    let out = ns.exec("ss", &["-tinH", "state", "established"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let cc_of = |local_port: bool| -> Vec<String> {
        lines
            .chunks(2)
            .filter(|p| {
                let cols: Vec<&str> = p[0].split_whitespace().collect();
                cols.len() >= 4 && cols[2].ends_with(":8070") == local_port
            })
            .map(|p| p[1].split_whitespace().next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(cc_of(true), vec![pick.to_string()], "the relay's side:\n{text}");
    assert_eq!(cc_of(false), vec![default.clone()], "the client's side keeps the default:\n{text}");

    let out = ns.cmd(support::BIN).args(["--tcp-congestion", "nosuch", "--ws-server-port", "8071"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tcp-congestion: tcp_congestion: the kernel has no congestion control \"nosuch\""), "{err}");
}

/// Idle clients hold no pooled buffers: the server's memory per idle connection is small.
#[test]
fn idle_clients_hold_no_buffers() {
    let ns = Netns::new("idlemem");
    let w = Wsnic::start(&ns, &["--max-clients", "400", "--max-clients-per-ip", "400"]);
    // Warm up: one client with traffic, so the pool and allocator are in steady state.
    let mut g = Guest::connect(&ns, mac(70), ip(70));
    g.arp(GW);
    let before = w.rss_kib();
    let n = 300;
    let clients: Vec<_> = (0..n).map(|_| raw_ws(&ns)).collect();
    assert!(eventually(20 * SEC, || ns.bridge_ports("wsnicbr0").len() == n + 1));
    std::thread::sleep(Duration::from_millis(1500)); // every handshake flushed, buffers returned
    let after = w.rss_kib();
    let per_client = (after.saturating_sub(before)) * 1024 / n as u64;
    println!("RSS {before} KiB → {after} KiB with {n} idle clients: {per_client} bytes each");
    assert!(per_client < 4096, "{per_client} bytes per idle client");
    drop(clients);
}

/// A second wsnic with the same bridge in the same namespace refuses to start and leaves the
/// running one alone (a live run holds a lock; a dead one's lock is gone with it).
#[test]
fn second_instance_with_the_same_bridge_refuses() {
    let ns = Netns::new("twice");
    let _w = Wsnic::start(&ns, &[]);
    let out = ns.cmd(support::BIN).args(["--ws-server-port", "8071"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another wsnic is running with bridge wsnicbr0"), "{err}");
    let mut g = Guest::connect(&ns, mac(80), ip(80));
    g.arp(GW); // the first one's bridge is still there and working
}

/// Bridges whose names differ only in punctuation (`br-0`, `br_0`) get tables of their own:
/// one instance stopping leaves the other's rules in place.
#[test]
fn similar_bridge_names_get_their_own_tables() {
    let ns = Netns::new("tables");
    let a = Wsnic::start(&ns, &["--bridge-name", "br-0", "--bridge-subnet", "10.9.1.0/24"]);
    let b = Wsnic::start(&ns, &["--bridge-name", "br_0", "--bridge-subnet", "10.9.2.0/24", "--ws-server-port", "8071"]);
    let tables = ns.nft_tables();
    assert!(tables.contains("wsnic_br_2d0") && tables.contains("wsnic_br__0"), "{tables}");
    let rules = |t: &str| String::from_utf8_lossy(&ns.exec("nft", &["list", "table", "ip", t]).stdout).into_owned();
    assert!(rules("wsnic_br_2d0").contains("daddr 10.9.1.1 "), "{}", rules("wsnic_br_2d0"));
    assert_eq!(b.stop(), 0);
    assert!(rules("wsnic_br_2d0").contains("daddr 10.9.1.1 "), "a's table after b stopped: {}", ns.nft_tables());
    assert_eq!(a.stop(), 0);
    assert!(!ns.nft_tables().contains("wsnic_"), "{}", ns.nft_tables());
}

/// SIGHUP re-reads the file: limits change for new connections, settings that need a restart
/// are named, a bad file keeps the running configuration, and connected clients stay.
#[test]
fn sighup_reloads_what_can_change() {
    let ns = Netns::new("hup");
    let dir = std::env::temp_dir().join(format!("wsnic-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("wsnic.conf");
    std::fs::write(&f, "max_clients_per_ip=1\n").unwrap();
    let mut w = Wsnic::start(&ns, &["-c", f.to_str().unwrap()]);
    let (a, mut first) = support::handshake_with(&ns, "/", "");
    assert_eq!(a, 101);
    assert_eq!(support::handshake_with(&ns, "/", "").0, 429);

    std::fs::write(&f, "max_clients_per_ip=2\nbridge_name=other0\n").unwrap();
    w.signal("HUP");
    let log = w.wait_log("reload: configuration read again", 5 * SEC);
    assert!(log.contains("reload: bridge_name changed but take effect only after a restart"), "{log}");
    let (b, _second) = support::handshake_with(&ns, "/", "");
    assert_eq!(b, 101, "the new limit applies");
    // The status page shows what runs: the new limit, the old bridge.
    let page = http(&ns, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.contains("(2 per address)") && page.contains("wsnicbr0 "), "{page}");
    assert!(!page.contains("other0"), "a setting that needs a restart shown as in force: {page}");

    std::fs::write(&f, "max_clients_per_ip=banana\n").unwrap();
    w.signal("HUP");
    w.wait_log("keeping the running configuration", 5 * SEC);
    assert_eq!(support::handshake_with(&ns, "/", "").0, 429, "still the limit of 2");
    // The first client never noticed: it still gets answers (a ping).
    first.write_all(&client_frame(9, b"alive?")).unwrap();
    loop {
        let (op, p) = read_frame(&mut first).unwrap();
        if op == 0xA {
            assert_eq!(p, b"alive?");
            break;
        }
    }
    assert!(ns.link_exists("wsnicbr0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_spare_tap_is_reused_clean_and_then_removed() {
    let ns = Netns::new("spare");
    let mut w = Wsnic::start(&ns, &[]);
    // The sleeper (wsnic0) reads nothing: frames flooded to it fill its TAP's kernel queue.
    let sleeper = raw_ws(&ns);
    w.wait_log("connected on wsnic0", 5 * SEC);
    let mut flooder = Guest::connect(&ns, mac(51), ip(51));
    flood(&mut flooder, mac(50), 10_000); // mac(50) is unknown to the bridge: flooded to the sleeper
    std::thread::sleep(Duration::from_millis(300));
    let stats = ns.ip(&["-s", "-j", "link", "show", "wsnic0"]);
    assert!(!stats.contains("\"dropped\":0}"), "the sleeper's queue should be full: {stats}");
    // The sleeper leaves; its TAP becomes a spare, and the next client gets it.
    drop(sleeper);
    w.wait_log("on wsnic0 disconnected", 5 * SEC);
    std::thread::sleep(Duration::from_millis(200));
    let mut next = Guest::connect(&ns, mac(52), ip(52));
    assert_eq!(w.log_text().matches("connected on wsnic0").count(), 2, "the spare was not reused:\n{}", w.log_text());
    // Nothing queued for the sleeper reaches the newcomer, and the newcomer's traffic flows.
    assert!(next.recv_until(SEC, |f| f[..6] == mac(50)).is_none(), "a frame queued for the previous client leaked");
    let gw_mac = next.arp(GW);
    next.send(frames::icmp_echo(8, next.mac, gw_mac, next.ip, GW, 9, 1, b"spare"));
    assert!(next.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip(52), 0, 9, 1))).is_some());
    // Once every client has left, spares do not linger.
    drop(next);
    drop(flooder);
    assert!(eventually(10 * SEC, || ns.bridge_ports("wsnicbr0").is_empty()), "{:?}", ns.bridge_ports("wsnicbr0"));
}

/// `tun_flags` and `threaded` of TAP `tap`, as the kernel shows them in `ns`'s sysfs.
fn napi_state(ns: &Netns, tap: &str) -> (bool, String) {
    let read = |f: &str| {
        let out = ns.exec("cat", &[&format!("/sys/class/net/{tap}/{f}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let flags = read("tun_flags");
    let flags =
        u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("tun_flags {flags:?}"));
    (flags & 0x10 != 0, read("threaded"))
}

#[test]
fn a_busy_clients_tap_gets_a_kernel_thread() {
    let ns = Netns::new("napi");
    let mut w = Wsnic::start(&ns, &[]);
    let mut busy = Guest::connect(&ns, mac(61), ip(61));
    w.wait_log("connected on wsnic0", 5 * SEC);
    let mut quiet = Guest::connect(&ns, mac(62), ip(62));
    w.wait_log("connected on wsnic1", 5 * SEC);
    // Both TAPs have a NAPI context; neither has a thread of its own yet.
    for tap in ["wsnic0", "wsnic1"] {
        assert_eq!(napi_state(&ns, tap), (true, "0".to_string()), "{tap}");
    }
    // The quiet client talks a little; the busy one sends 5000 frames at once.
    let gw_mac = quiet.arp(GW);
    flood(&mut busy, gw_mac, 5000);
    assert!(
        eventually(10 * SEC, || napi_state(&ns, "wsnic0").1 == "1"),
        "the busy client's TAP got no kernel thread: {:?}",
        napi_state(&ns, "wsnic0")
    );
    assert_eq!(napi_state(&ns, "wsnic1"), (true, "0".to_string()), "the quiet client's TAP got a thread");
    // Frames still go both ways through the threaded TAP and the other one.
    for (g, seq) in [(&mut busy, 1), (&mut quiet, 2)] {
        g.send(frames::icmp_echo(8, g.mac, gw_mac, g.ip, GW, 11, seq, b"napi"));
        let (gi, want) = (g.ip, seq);
        assert!(g.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, gi, 0, 11, want))).is_some(), "{gi}");
    }
    // A TAP with a thread is not kept as a spare: the next client gets one without.
    drop(busy);
    w.wait_log("on wsnic0 disconnected", 5 * SEC);
    std::thread::sleep(Duration::from_millis(200));
    let _next = Guest::connect(&ns, mac(64), ip(64));
    assert!(eventually(5 * SEC, || w.log_text().matches("connected on wsnic").count() == 3), "{}", w.log_text());
    let log = w.log_text();
    let tap = log.rsplit("connected on ").next().unwrap().split_whitespace().next().unwrap().to_string();
    assert_ne!(tap, "wsnic1", "{log}");
    assert_eq!(napi_state(&ns, &tap), (true, "0".to_string()), "{tap} came with a thread:\n{log}");
    w.assert_running();
}

#[test]
fn tap_threads_false_keeps_every_frame_in_the_event_loop() {
    let ns = Netns::new("nonapi");
    let mut w = Wsnic::start(&ns, &["--tap-threads", "false"]);
    let mut busy = Guest::connect(&ns, mac(63), ip(63));
    w.wait_log("connected on wsnic0", 5 * SEC);
    let gw_mac = busy.arp(GW);
    flood(&mut busy, gw_mac, 5000);
    // Two ticks of the event loop later, still no NAPI context and no thread.
    std::thread::sleep(2 * SEC);
    assert_eq!(napi_state(&ns, "wsnic0"), (false, "0".to_string()));
    busy.send(frames::icmp_echo(8, busy.mac, gw_mac, busy.ip, GW, 12, 1, b"no napi"));
    assert!(busy.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip(63), 0, 12, 1))).is_some());
}

/// A thread of another process stopped under ptrace (only that thread: `PTRACE_INTERRUPT`, no
/// group stop) until dropped. Every call comes from the thread that made it.
struct StoppedThread(libc::pid_t);

impl StoppedThread {
    fn new(tid: libc::pid_t) -> StoppedThread {
        // SAFETY: ptrace and waitpid on a thread id; no pointers are passed.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0), 0, "seize: {}", std::io::Error::last_os_error());
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0, "interrupt");
            let mut st = 0;
            assert_eq!(libc::waitpid(tid, &mut st, libc::__WALL), tid, "waitpid");
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: as above; the thread goes on from where it stopped.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The thread of process `pid` named `name`, once it exists (threads name themselves after they
/// start).
fn thread_named(pid: u32, name: &str) -> libc::pid_t {
    let find = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
            .and_then(|e| e.file_name().to_str()?.parse().ok())
    };
    let mut tid = None;
    assert!(
        eventually(5 * SEC, || {
            tid = find();
            tid.is_some()
        }),
        "no thread {name} in {pid}"
    );
    tid.unwrap()
}

/// Finished clients' TAPs are still bridge ports, and not yet spares, until the reaper thread is
/// done with them. When 16 wait, new connections wait in the listen queue; once the reaper
/// catches up they are served. The reaper is held still under ptrace to make it
/// fall behind: stopped while idle (no client has left yet), so it holds no lock the event loop
/// needs.
#[test]
fn new_connections_wait_while_the_reaper_is_behind() {
    let ns = Netns::new("reapwait");
    let mut w = Wsnic::start(&ns, &[]);
    let reaper = StoppedThread::new(thread_named(w.pid(), "wsnic-reaper"));
    for n in 1..=16 {
        drop(raw_ws(&ns));
        assert!(
            eventually(5 * SEC, || w.log_text().matches(" disconnected after ").count() == n),
            "client {n} not finished:\n{}",
            w.log_text()
        );
    }
    assert_eq!(ns.bridge_ports("wsnicbr0").len(), 16, "the finished clients' TAPs wait for the reaper");
    // The 17th connection is not accepted while 16 TAPs wait: no answer, not even a refusal.
    let mut late = ns.tcp("127.0.0.1:8070");
    late.write_all(support::UPGRADE_REQUEST).unwrap();
    late.set_read_timeout(Some(SEC)).unwrap();
    let mut b = [0u8; 1];
    let r = late.read(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "answered while the reaper was behind: {r:?}"
    );
    w.wait_log("finished clients' TAPs still being removed; new connections wait", SEC);
    // The reaper goes on: the waiting connection is served, and once the spares expire its
    // client's TAP is the only port.
    drop(reaper);
    late.set_read_timeout(Some(10 * SEC)).unwrap();
    let head = support::read_head(&mut late);
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    assert!(eventually(10 * SEC, || ns.bridge_ports("wsnicbr0").len() == 1), "{:?}", ns.bridge_ports("wsnicbr0"));
    w.assert_running();
}

/// A client still sending when the relay ends it (a frame over the size limit, its payload
/// still arriving) gets its Close and then a clean end of stream, never a reset: the relay
/// reads and throws away what it still sends until it closes (a lingering close). Closing
/// with that input unread would have answered with a reset.
#[test]
fn a_client_ended_while_sending_gets_its_close_not_a_reset() {
    let ns = Netns::new("linger");
    let mut w = Wsnic::start(&ns, &[]);
    let mut s = raw_ws(&ns);
    // The header says 4 MiB: refused from the header alone (1009); the rest keeps coming.
    let frame = client_frame(2, &vec![0u8; 4 << 20]);
    s.write_all(&frame).expect("the relay takes what the client still sends (no reset)");
    let close = loop {
        match read_frame(&mut s).expect("frames, then a Close (no reset)") {
            (8, p) => break p,
            _ => continue,
        }
    };
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1009);
    let mut b = [0u8; 64];
    assert_eq!(s.read(&mut b).expect("an end of stream, not a reset"), 0);
    drop(s);
    w.wait_log("frame too big", 5 * SEC);
    assert_eq!(w.stop(), 0);
}

/// SIGTERM while a client has frames queued that it has not read yet: the relay keeps
/// running (for up to 2 s) while the client reads them, so it gets every whole frame and
/// then the Close (1001), not a stream cut short.
#[test]
fn sigterm_flushes_a_busy_client_and_its_close() {
    let ns = Netns::new("stopflush");
    let mut w = Wsnic::start(&ns, &[]);
    let mut sleeper = raw_ws(&ns);
    let mut g = Guest::connect(&ns, mac(51), ip(51));
    // To mac(50), unknown to the bridge, so flooded to the sleeper, which reads nothing yet:
    // its socket and the relay's output buffer fill up.
    flood(&mut g, mac(50), 5_000);
    std::thread::sleep(Duration::from_millis(300));
    w.signal("TERM");
    let mut frames = 0;
    let close = loop {
        match read_frame(&mut sleeper).expect("whole frames, then a Close (the stream is not cut short)") {
            (8, p) => break p,
            _ => frames += 1,
        }
    };
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001, "after {frames} frames");
    assert!(frames > 100, "the flood reached the sleeper: {frames} frames");
    let mut b = [0u8; 64];
    assert_eq!(sleeper.read(&mut b).expect("an end of stream, not a reset"), 0);
    drop(g);
    assert_eq!(w.wait_exit(), 0);
}

/// Out of descriptors, an accept fails and the connection waits in the listen queue. Once
/// descriptors are free again it is served within a tick, without another connection having
/// to arrive first: the listener is edge-triggered, and the failed connection brings no new
/// event of its own.
#[test]
fn a_failed_accept_is_tried_again() {
    let ns = Netns::new("emfile");
    let mut w = Wsnic::start(&ns, &[]);
    let pid = w.pid().to_string();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    let (soft, hard) = (nofile[3].to_string(), nofile[4].to_string());
    let set_soft = |n: &str| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}:{hard}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The lowest descriptor number not in use: as the limit, the next accept fails (EMFILE).
    let used: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
    set_soft(&lowest_free.to_string());
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(10 * SEC)).unwrap();
    s.write_all(support::UPGRADE_REQUEST).unwrap();
    w.wait_log("accept: ", 5 * SEC);
    set_soft(&soft);
    let head = support::read_head(&mut s);
    assert!(head.starts_with(b"HTTP/1.1 101"), "served once descriptors were free: {}", String::from_utf8_lossy(&head));
    drop(s);
    assert_eq!(w.stop(), 0);
}
