//! Safe to expose: admission limits, Origin and token checks, anti-spoofing, reconnect
//! takeover, client isolation, the egress policy and rate shaping — each against a real
//! relay in its own namespaces.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use support::lab::Lab;
use support::{eventually, frames, handshake_with, Guest, Netns, Wsnic};

const SEC: Duration = Duration::from_secs(1);
const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

fn mac(n: u8) -> [u8; 6] {
    [0x02, 0x00, 0x5e, 0x10, 0x00, n]
}

#[test]
fn over_limit_handshakes_are_refused_without_a_tap() {
    let ns = Netns::new("limits");
    let mut w =
        Wsnic::start(&ns, &["--max-clients", "3", "--max-clients-per-ip", "2", "--trusted-proxies", "127.0.0.1"]);
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let (a, _ka) = handshake_with(&ns, "/", &xff("203.0.113.10"));
    let (b, _kb) = handshake_with(&ns, "/", &xff("203.0.113.10"));
    assert_eq!((a, b), (101, 101));
    let (c, _) = handshake_with(&ns, "/", &xff("203.0.113.10"));
    assert_eq!(c, 429, "a third connection from one address");
    // A client cannot slip past by putting an address in front of the proxy's.
    let (d, _) = handshake_with(&ns, "/", &xff("203.0.113.99, 203.0.113.10"));
    assert_eq!(d, 429);
    let (e, _ke) = handshake_with(&ns, "/", &xff("203.0.113.11"));
    assert_eq!(e, 101);
    let (f, _) = handshake_with(&ns, "/", &xff("203.0.113.12"));
    assert_eq!(f, 503, "max_clients");
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").len() == 3), "{:?}", ns.bridge_ports("wsnicbr0"));
    let log = w.wait_log("(server_full)", 5 * SEC);
    assert!(log.contains("(per_ip_limit)") && log.contains("for 203.0.113.11"), "{log}");
}

#[test]
fn untrusted_peers_cannot_choose_their_address() {
    let ns = Netns::new("xff");
    let _w = Wsnic::start(&ns, &["--max-clients-per-ip", "1"]);
    let (a, _ka) = handshake_with(&ns, "/", "X-Forwarded-For: 203.0.113.1\r\n");
    let (b, _) = handshake_with(&ns, "/", "X-Forwarded-For: 203.0.113.2\r\n");
    assert_eq!((a, b), (101, 429), "X-Forwarded-For from a peer not in trusted_proxies is ignored");
}

#[test]
fn origin_and_token_checks() {
    let ns = Netns::new("auth");
    let _w = Wsnic::start(&ns, &["--allowed-origins", "https://good.example", "--auth-token", "s3cret-T0ken"]);
    let good = "Origin: https://good.example\r\n";
    assert_eq!(handshake_with(&ns, "/?token=s3cret-T0ken", good).0, 101);
    assert_eq!(handshake_with(&ns, "/s3cret-T0ken", good).0, 101, "the token as the URL path");
    assert_eq!(handshake_with(&ns, "/?token=s3cret-T0ken", "Origin: https://evil.example\r\n").0, 403);
    assert_eq!(handshake_with(&ns, "/?token=s3cret-T0ken", "").0, 403, "no Origin");
    for wrong in ["/", "/?token=", "/?token=s3cret-T0ke", "/?token=s3cret-T0ken-", "/S3CRET-T0KEN"] {
        assert_eq!(handshake_with(&ns, wrong, good).0, 401, "{wrong}");
    }
    assert!(ns.bridge_ports("wsnicbr0").len() <= 2);
}

/// A victim with a DHCP address; an attacker that spoofs its MAC, its IP and its ARP.
#[test]
fn spoofing_is_dropped_and_the_victim_is_unaffected() {
    let ns = Netns::new("spoof");
    let mut w = Wsnic::start(&ns, &[]);
    let mut victim = Guest::connect(&ns, mac(1), Ipv4Addr::UNSPECIFIED);
    let v_ip = victim.dhcp(1).unwrap();
    let gw_mac = victim.arp(GW);
    let mut att = Guest::connect(&ns, mac(2), Ipv4Addr::UNSPECIFIED);
    let a_ip = att.dhcp(2).unwrap();
    att.arp(GW);

    // 1. Another source MAC (the victim's): dropped.
    att.send(frames::icmp_echo(8, mac(1), gw_mac, v_ip, GW, 0x51, 1, b"spoof"));
    // 2. Its own MAC, the victim's address: dropped.
    att.send(frames::icmp_echo(8, mac(2), gw_mac, v_ip, GW, 0x52, 1, b"spoof"));
    // 3. ARP poisoning: "the victim's address is at my MAC" — dropped.
    let mut garp = frames::arp_request(mac(2), v_ip, v_ip);
    garp[0..6].copy_from_slice(&frames::BROADCAST);
    att.send(garp);
    // The victim never sees replies to what was sent in its name…
    assert!(victim.recv_until(SEC, |f| matches!(frames::icmp_of(f), Some((_, _, 0, 0x51 | 0x52, _)))).is_none());
    // …the bridge still has the victim's MAC for its address…
    let neigh = ns.ip(&["neigh", "show", &v_ip.to_string(), "dev", "wsnicbr0"]);
    assert!(!neigh.contains("02:00:5e:10:00:02"), "ARP poisoned: {neigh}");
    // …and the victim's own traffic flows.
    victim.send(frames::icmp_echo(8, mac(1), gw_mac, v_ip, GW, 0x60, 1, b"mine"));
    assert!(victim.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, v_ip, 0, 0x60, 1))).is_some());
    // 4. DHCP in the victim's name (its chaddr, from the attacker's own MAC): no answer, and
    //    the victim keeps its lease.
    let mut theft = frames::dhcp_client(1, mac(1), 0x77, Some(v_ip), None, Ipv4Addr::UNSPECIFIED);
    theft[6..12].copy_from_slice(&mac(2));
    att.send(theft);
    assert!(att.recv_until(SEC, |f| frames::dhcp_reply(f, 0x77).is_some()).is_none(), "DHCP answered a thief");
    // The attacker's honest traffic still works.
    att.send(frames::icmp_echo(8, mac(2), gw_mac, a_ip, GW, 0x61, 1, b"honest"));
    assert!(att.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, a_ip, 0, 0x61, 1))).is_some());
    drop(att);
    let log = w.wait_log("policy 4", 5 * SEC);
    assert!(log.contains("policy 4"), "{log}");
    assert_eq!(victim.dhcp(3), Some(v_ip), "the victim's lease survived");

    // A client without a lease may still not claim the gateway's address, nor hide behind a
    // VLAN tag.
    let mut third = Guest::connect(&ns, mac(3), Ipv4Addr::UNSPECIFIED);
    third.send(frames::arp_request(mac(3), GW, GW));
    let mut tagged = frames::arp_request(mac(3), Ipv4Addr::new(192, 168, 2, 99), GW);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    third.send(tagged);
    third.send(frames::arp_request(mac(3), Ipv4Addr::new(192, 168, 2, 99), GW)); // honest
    assert!(third.recv_until(5 * SEC, |f| frames::arp_reply_from(f, GW).is_some()).is_some());
    drop(third);
    w.wait_log("policy 2, offload 0)", 5 * SEC);
}

#[test]
fn a_mac_in_use_by_another_client_is_refused() {
    let ns = Netns::new("macuse");
    let _w = Wsnic::start(&ns, &["--trusted-proxies", "127.0.0.1"]);
    let (s1, k1) = handshake_with(&ns, "/", "X-Forwarded-For: 203.0.113.1\r\n");
    let (s2, k2) = handshake_with(&ns, "/", "X-Forwarded-For: 203.0.113.2\r\n");
    assert_eq!((s1, s2), (101, 101));
    let mut owner = Guest::over(k1, mac(7));
    let owner_ip = owner.dhcp(1).unwrap();
    let mut thief = Guest::over(k2, mac(7)); // another client, the same MAC
    thief.send(frames::dhcp_client(1, mac(7), 99, None, None, Ipv4Addr::UNSPECIFIED));
    assert!(
        thief.recv_until(2 * SEC, |f| frames::dhcp_reply(f, 99).is_some()).is_none(),
        "the thief got a DHCP answer"
    );
    let gw = owner.arp(GW);
    owner.send(frames::icmp_echo(8, mac(7), gw, owner_ip, GW, 5, 1, b"still mine"));
    assert!(owner.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, owner_ip, 0, 5, 1))).is_some());
}

/// A browser VM reconnects (same MAC, same client) while its old socket is still open: the
/// new connection takes MAC and address over; the stale one is closed.
#[test]
fn reconnect_takes_over_from_the_stale_connection() {
    let ns = Netns::new("takeover");
    let mut w = Wsnic::start(&ns, &[]);
    let mut old = Guest::connect(&ns, mac(9), Ipv4Addr::UNSPECIFIED);
    let ip = old.dhcp(1).unwrap();
    // A second connection using the MAC while the first is active is refused (1008): clients
    // behind one NAT share an address, and one must not evict another.
    let mut rival = Guest::connect(&ns, mac(9), Ipv4Addr::UNSPECIFIED);
    rival.send(frames::arp_request(mac(9), ip, GW));
    assert_eq!(rival.close_code(), Some(1008));
    // The old socket goes silent (the tab that held it is gone)…
    std::thread::sleep(Duration::from_millis(5500));
    let mut new = Guest::connect(&ns, mac(9), Ipv4Addr::UNSPECIFIED);
    assert_eq!(new.dhcp(2), Some(ip), "the address follows the MAC to the new connection");
    let gw = new.arp(GW);
    new.send(frames::icmp_echo(8, mac(9), gw, ip, GW, 3, 1, b"new"));
    assert!(new.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip, 0, 3, 1))).is_some(), "black-holed");
    assert_eq!(old.close_code(), Some(1001));
    w.wait_log("taken over", 5 * SEC);
}

fn two_static_guests(args: &[&str]) -> Lab {
    let mut lab = Lab::new(args);
    lab.add_static_guest(10);
    lab.add_static_guest(11);
    lab
}

#[test]
fn client_isolation_on_and_off() {
    let on = two_static_guests(&["--client-isolation", "true"]);
    assert!(on.ping(0, "192.168.2.1") && on.ping(1, "192.168.2.1"), "isolated clients still reach the gateway");
    assert!(!on.ping(0, "192.168.2.11"), "isolated clients reached each other");
    let off = two_static_guests(&[]);
    assert!(off.ping(0, "192.168.2.11"), "without isolation clients reach each other");
}

/// Egress: the Internet yes; the host, metadata and private ranges on the uplink side no.
#[test]
fn egress_policy_keeps_clients_off_the_host_and_private_ranges() {
    let mut lab = Lab::new(&[]);
    // The uplink peer also holds a private address, the metadata address and a public one.
    for a in ["10.1.2.3/32", "169.254.169.254/32", "203.0.113.200/32"] {
        lab.upl.ip(&["addr", "add", a, "dev", "peer0"]);
    }
    let g = lab.add_static_guest(10);
    let guest = &lab.guests[g];
    let ping = |to: &str| guest.exec("ping", &["-c", "1", "-W", "1", to]).status.success();
    assert!(ping("198.51.100.1"), "Internet-bound traffic passes");
    assert!(ping("203.0.113.200"));
    assert!(ping("192.168.2.1"), "ICMP to the gateway");
    assert!(!ping("10.1.2.3"), "RFC 1918 behind the uplink");
    assert!(!ping("169.254.169.254"), "metadata service");
    assert!(!ping("198.51.100.2"), "the host's uplink address");
    // The relay's own WebSocket port, through the gateway address: refused.
    let out =
        guest.exec("curl", &["-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", "http://192.168.2.1:8070/"]);
    assert!(!out.status.success(), "the host's TCP ports are reachable: {}", String::from_utf8_lossy(&out.stdout));
    // The table is IPv4: IPv6 is off on the bridge, so no link-local way around it.
    let v6 = lab.relay.ip(&["-6", "addr", "show", "dev", "wsnicbr0"]);
    assert!(!v6.contains("inet6"), "{v6}");

    // egress_allow opens a hole, egress_deny closes one.
    drop(lab.wsnic.take());
    lab.relay_args =
        ["--egress-allow", "10.1.2.3/32", "--egress-deny", "203.0.113.0/24"].iter().map(|s| s.to_string()).collect();
    lab.start_relay();
    let guest = &lab.guests[g];
    let ping = |to: &str| eventually(10 * SEC, || guest.exec("ping", &["-c", "1", "-W", "1", to]).status.success());
    assert!(ping("10.1.2.3"), "egress_allow");
    assert!(!guest.exec("ping", &["-c", "2", "-W", "1", "203.0.113.200"]).status.success(), "egress_deny");
}

/// `iperf3` through a 10 Mbit/s shaped client: at least 80% of the limit (shaping, not the
/// collapse that policing causes), and not much over it.
#[test]
fn rate_limit_shapes_tcp() {
    let mut lab = Lab::new(&["--rate-limit", "10mbit"]);
    let g = lab.add_static_guest(10);
    lab.upl.spawn("iperf3", &["-s", "-B", "198.51.100.1"], &lab.logs.join("iperf.log"));
    assert!(lab.ping(g, "198.51.100.1"));
    std::thread::sleep(Duration::from_millis(200));
    for reverse in [false, true] {
        let mbit = support::iperf_mbit(&lab.guests[g], "198.51.100.1", 4, reverse);
        println!("rate_limit=10mbit, {}: {mbit:.2} Mbit/s", if reverse { "uplink→guest" } else { "guest→uplink" });
        assert!((8.0..=11.0).contains(&mbit), "{mbit:.2} Mbit/s under a 10 Mbit/s limit");
    }
}

/// Slow-loris from one address: it may hold only so many unfinished handshakes (16 with the
/// default per-IP limit of 8); the next connection is closed at once.
#[test]
fn one_address_cannot_hold_every_handshake_slot() {
    use std::io::{Read, Write};
    let ns = Netns::new("loris");
    let _w = Wsnic::start(&ns, &[]);
    let held: Vec<_> = (0..16)
        .map(|_| {
            let mut s = ns.tcp("127.0.0.1:8070");
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = ns.tcp("127.0.0.1:8070");
    extra.set_read_timeout(Some(5 * SEC)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap_or(0), 0, "the 17th unfinished handshake was kept");
    // The held ones are still open (not closed by the server).
    let mut first = held.into_iter().next().unwrap();
    first.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(first.read(&mut b).is_err(), "a held handshake was closed");
}

/// One IPv6 host can pick a new address in its /64 for every connection: the per-address
/// limit counts the /64, not the address (real sockets from three source addresses).
#[test]
fn an_ipv6_64_counts_as_one_address() {
    let ns = Netns::new("v6limit");
    for a in ["2001:db8:1:2::a/64", "2001:db8:1:2::b/64", "2001:db8:1:3::a/64"] {
        ns.ip(&["-6", "addr", "add", a, "dev", "lo", "nodad"]);
    }
    let _w = Wsnic::start(&ns, &["--ws-server-addr", "::", "--max-clients-per-ip", "1"]);
    let upgrade_from = |src: &'static str| -> (u16, std::net::TcpStream) {
        ns.enter(move || {
            use std::io::{Read, Write};
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
            let from: std::net::SocketAddr = format!("[{src}]:0").parse().unwrap();
            s.bind(&from.into()).unwrap();
            let to: std::net::SocketAddr = "[2001:db8:1:2::a]:8070".parse().unwrap();
            s.connect(&to.into()).unwrap();
            let mut s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
            (status, s)
        })
    };
    let (first, _a) = upgrade_from("2001:db8:1:2::a");
    assert_eq!(first, 101);
    let (second, _b) = upgrade_from("2001:db8:1:2::b");
    assert_eq!(second, 429, "another address of the same /64");
    let (third, _c) = upgrade_from("2001:db8:1:3::a");
    assert_eq!(third, 101, "another /64");
}
