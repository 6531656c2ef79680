//! `workers = N`: event loops sharing the port with SO_REUSEPORT. Connections spread over the
//! workers (each connect line names its worker), clients on different workers share one LAN,
//! one DHCP pool, one anti-spoofing map and one set of limits, the status counts everyone,
//! SIGTERM stops every worker before the network goes, SIGHUP reaches every worker — each
//! against a real relay in its own namespace.
//!
//! Which worker a connection landed on is read from the log (`[w1] 127.0.0.1:PORT connected
//! on …`); where a test needs a connection on a given worker it reconnects until the kernel
//! puts one there.

mod support;

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use support::{eventually, frames, handshake_with, Guest, Netns, Wsnic};

const SEC: Duration = Duration::from_secs(1);
const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

fn mac(n: u8) -> [u8; 6] {
    [0x02, 0x00, 0x5e, 0x30, 0x00, n]
}

fn port_of(s: &TcpStream) -> u16 {
    s.local_addr().unwrap().port()
}

/// The worker that logged the connection from local port `port` (the last such line).
fn worker_of(w: &mut Wsnic, port: u16) -> usize {
    let needle = format!(" 127.0.0.1:{port} ");
    let log = w.wait_log(&needle, 5 * SEC);
    let line = log.lines().rev().find(|l| l.contains(&needle) && l.contains("connected on")).expect("connect line");
    let tag = line.split("[w").nth(1).unwrap_or_else(|| panic!("no worker tag: {line}"));
    tag.split(']').next().unwrap().parse().unwrap()
}

/// A guest connected through worker `want` (others are opened and dropped until one is).
fn guest_on(ns: &Netns, w: &mut Wsnic, want: usize, m: [u8; 6]) -> Guest {
    for _ in 0..64 {
        let g = Guest::connect(ns, m, Ipv4Addr::UNSPECIFIED);
        if worker_of(w, port_of(g.ws.get_ref())) == want {
            return g;
        }
    }
    panic!("64 connections and none on worker {want}");
}

/// An upgraded stream for client address `xff` (a trusted proxy's X-Forwarded-For) through
/// worker `want`.
fn stream_on(ns: &Netns, w: &mut Wsnic, want: usize, xff: &str) -> TcpStream {
    for _ in 0..64 {
        let (status, s) = handshake_with(ns, "/", &format!("X-Forwarded-For: {xff}\r\n"));
        assert_eq!(status, 101);
        if worker_of(w, port_of(&s)) == want {
            return s;
        }
    }
    panic!("64 connections and none on worker {want}");
}

/// Lines of `log` of connections accepted by each of two workers.
fn per_worker(log: &str) -> [usize; 2] {
    let n = |w: &str| log.lines().filter(|l| l.contains(w) && l.contains("connected on")).count();
    [n("[w0] "), n("[w1] ")]
}

#[test]
fn connections_spread_and_clients_on_different_workers_share_the_lan() {
    let ns = Netns::new("spread");
    let mut w = Wsnic::start(&ns, &["--workers", "2", "--max-clients-per-ip", "32"]);
    assert!(w.log_text().contains("with 2 workers"));
    let mut guests: Vec<Guest> =
        (0..16).map(|i| Guest::connect(&ns, mac(i), Ipv4Addr::new(192, 168, 2, 10 + i))).collect();
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").len() == 16));
    let log = w.log_text();
    let spread = per_worker(&log);
    assert_eq!(spread[0] + spread[1], 16, "{log}");
    assert!(spread[0] > 0 && spread[1] > 0, "16 connections all on one worker: {spread:?}\n{log}");

    // One guest on each worker: ARP and ping between them cross the bridge.
    let on: Vec<usize> = guests.iter().map(|g| worker_of(&mut w, port_of(g.ws.get_ref()))).collect();
    let ia = on.iter().position(|&x| x == 0).unwrap();
    let ib = on.iter().position(|&x| x == 1).unwrap();
    let mut b = guests.remove(ib);
    let mut a = guests.remove(if ia > ib { ia - 1 } else { ia });
    let (a_ip, b_ip) = (a.ip, b.ip);
    let echoer = std::thread::spawn(move || {
        // Answers the ARP request on the way; answers the echo request itself.
        let req = b.recv_until(10 * SEC, |f| matches!(frames::icmp_of(f), Some((s, _, 8, 0x77, 1)) if s == a_ip));
        let req = req.expect("the echo request from the other worker's client did not arrive");
        b.send(frames::answer(&req, b.mac, b.ip).unwrap());
        b
    });
    let b_mac = a.arp(b_ip);
    a.send(frames::icmp_echo(8, a.mac, b_mac, a_ip, b_ip, 0x77, 1, b"across workers"));
    let reply = a.recv_until(10 * SEC, |f| frames::icmp_of(f) == Some((b_ip, a_ip, 0, 0x77, 1)));
    assert!(reply.is_some(), "no echo reply from the client on the other worker");
    echoer.join().unwrap();
}

#[test]
fn one_dhcp_pool_across_workers() {
    let ns = Netns::new("wdhcp");
    let dir = std::env::temp_dir().join(format!("wsnic-wdhcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let leases = dir.join("leases");
    let mut w = Wsnic::start(
        &ns,
        &["--workers", "2", "--max-clients-per-ip", "32", "--dhcp-lease-file", leases.to_str().unwrap()],
    );
    let guests: Vec<Guest> = (0..20).map(|i| Guest::connect(&ns, mac(i), Ipv4Addr::UNSPECIFIED)).collect();
    let spread = per_worker(&w.wait_log("connected on", 5 * SEC));
    assert!(spread[0] > 0 && spread[1] > 0, "{spread:?}");
    // Every guest asks at once: both workers answer from the one pool concurrently.
    let threads: Vec<_> = guests
        .into_iter()
        .enumerate()
        .map(|(i, mut g)| {
            std::thread::spawn(move || {
                let ip = g.dhcp(0x1000 + i as u32).expect("no OFFER");
                (ip, g)
            })
        })
        .collect();
    let got: Vec<(Ipv4Addr, Guest)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ips: HashSet<Ipv4Addr> = got.iter().map(|(ip, _)| *ip).collect();
    assert_eq!(ips.len(), 20, "an address was given twice: {:?}", got.iter().map(|(ip, _)| ip).collect::<Vec<_>>());
    assert!(eventually(5 * SEC, || {
        let text = std::fs::read_to_string(&leases).unwrap_or_default();
        ips.iter().all(|ip| text.contains(&format!("{ip} ")))
    }));
    let text = std::fs::read_to_string(&leases).unwrap();
    assert_eq!(text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count(), 20, "{text}");
    drop(got);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The MAC map is one for all workers: another client cannot use a MAC held on the other
/// worker; the same client may take it over once the old connection is silent, and the old
/// one is closed on its own worker.
#[test]
fn a_mac_held_on_one_worker_is_refused_or_taken_over_on_the_other() {
    let ns = Netns::new("wmac");
    let mut w = Wsnic::start(&ns, &["--workers", "2", "--trusted-proxies", "127.0.0.1", "--max-clients-per-ip", "64"]);
    let mut owner = Guest::over(stream_on(&ns, &mut w, 0, "203.0.113.1"), mac(7));
    let ip = owner.dhcp(1).unwrap();
    let gw = owner.arp(GW);

    // Another client address on worker 1, the owner's MAC: refused.
    let mut thief = Guest::over(stream_on(&ns, &mut w, 1, "203.0.113.2"), mac(7));
    thief.send(frames::dhcp_client(1, mac(7), 99, None, None, Ipv4Addr::UNSPECIFIED));
    assert!(thief.recv_until(2 * SEC, |f| frames::dhcp_reply(f, 99).is_some()).is_none(), "the thief got an answer");
    owner.send(frames::icmp_echo(8, mac(7), gw, ip, GW, 5, 1, b"still mine"));
    assert!(owner.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip, 0, 5, 1))).is_some());

    // The same client on worker 1 while the owner is active: the newcomer is closed (1008).
    let mut rival = Guest::over(stream_on(&ns, &mut w, 1, "203.0.113.1"), mac(7));
    rival.send(frames::arp_request(mac(7), ip, GW));
    assert_eq!(rival.close_code(), Some(1008));
    owner.send(frames::icmp_echo(8, mac(7), gw, ip, GW, 5, 2, b"still mine"));
    assert!(owner.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip, 0, 5, 2))).is_some());

    // The owner goes silent; the same client reconnects on worker 1 and takes over.
    std::thread::sleep(Duration::from_millis(5500));
    let mut new = Guest::over(stream_on(&ns, &mut w, 1, "203.0.113.1"), mac(7));
    assert_eq!(new.dhcp(2), Some(ip), "the address follows the MAC to the new connection");
    let gw = new.arp(GW);
    new.send(frames::icmp_echo(8, mac(7), gw, ip, GW, 6, 1, b"new"));
    assert!(new.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip, 0, 6, 1))).is_some(), "black-holed");
    assert_eq!(owner.close_code(), Some(1001));
    let log = w.wait_log("taken over", 5 * SEC);
    assert!(log.lines().any(|l| by_worker(l, 0) && l.contains("taken over")), "{log}");
}

/// Was log line `l` written by worker `w`?
fn by_worker(l: &str, w: usize) -> bool {
    l.contains(&format!(" [w{w}] "))
}

/// Refuse handshakes for `xff` until both workers have refused one, checking the status of
/// each.
fn refused_by_both(ns: &Netns, w: &Wsnic, xff: &str, status: u16, reason: &str) {
    for _ in 0..64 {
        let (s, _) = handshake_with(ns, "/", &format!("X-Forwarded-For: {xff}\r\n"));
        assert_eq!(s, status, "{xff}");
        let log = w.log_text();
        // Each worker logs its first refusal of a kind (then rate-limits).
        if (0..2).all(|k| log.lines().any(|l| by_worker(l, k) && l.contains(reason))) {
            return;
        }
    }
    panic!("64 refusals and not both workers among them:\n{}", w.log_text());
}

#[test]
fn client_limits_are_global() {
    let ns = Netns::new("wlimits");
    let w = Wsnic::start(
        &ns,
        &["--workers", "2", "--max-clients", "3", "--max-clients-per-ip", "2", "--trusted-proxies", "127.0.0.1"],
    );
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let (a, _ka) = handshake_with(&ns, "/", &xff("203.0.113.10"));
    let (b, _kb) = handshake_with(&ns, "/", &xff("203.0.113.10"));
    assert_eq!((a, b), (101, 101));
    refused_by_both(&ns, &w, "203.0.113.10", 429, "(per_ip_limit)");
    let (c, _kc) = handshake_with(&ns, "/", &xff("203.0.113.11"));
    assert_eq!(c, 101);
    refused_by_both(&ns, &w, "203.0.113.12", 503, "(server_full)");
    assert_eq!(ns.bridge_ports("wsnicbr0").len(), 3);
}

fn metric(ns: &Netns, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// /metrics and the status page count the clients and traffic of every worker (the other
/// workers' as of their last report, at most a second old).
#[test]
fn metrics_count_every_worker() {
    let ns = Netns::new("wmetrics");
    let mut w = Wsnic::start(&ns, &["--workers", "2", "--max-clients-per-ip", "32"]);
    let mut a = guest_on(&ns, &mut w, 0, mac(1));
    let mut b = guest_on(&ns, &mut w, 1, mac(2));
    // The hunt left extra connections; wait until only these two remain.
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").len() == 2));
    let clients = || metric(&ns, "wsnic_clients");
    assert!(eventually(5 * SEC, || clients() == Some(2)), "wsnic_clients: {:?}", clients());
    let before = metric(&ns, "wsnic_frames_answered_total").unwrap();
    a.dhcp(1).unwrap();
    b.dhcp(2).unwrap();
    // Two DISCOVERs and two REQUESTs answered in-line, by two workers.
    let answered = || metric(&ns, "wsnic_frames_answered_total").unwrap();
    assert!(eventually(5 * SEC, || answered() >= before + 4), "{}", answered());
    assert!(eventually(5 * SEC, || metric(&ns, "wsnic_dhcp_messages_total{type=\"discover\"}") == Some(2)));
}

#[test]
fn sigterm_stops_every_worker_before_the_network_goes() {
    let ns = Netns::new("wterm");
    let mut w = Wsnic::start(&ns, &["--workers", "2", "--max-clients-per-ip", "32"]);
    let mut guests: Vec<Guest> = (0..6).map(|i| Guest::connect(&ns, mac(i), Ipv4Addr::UNSPECIFIED)).collect();
    guests.push(guest_on(&ns, &mut w, 0, mac(6)));
    guests.push(guest_on(&ns, &mut w, 1, mac(7)));
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").len() == 8));
    assert!(ns.nft_tables().contains("wsnic_wsnicbr0"));
    let log_path = w.log.clone();
    assert_eq!(w.stop(), 0);
    for g in &mut guests {
        assert_eq!(g.close_code(), Some(1001));
    }
    assert!(!ns.link_exists("wsnicbr0"), "the bridge is left");
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains("wsnic"), "TAPs are left: {links}");
    assert!(!ns.nft_tables().contains("wsnic"), "the nft table is left");
    let log = std::fs::read_to_string(log_path).unwrap();
    let down = log.find("network state restored").expect("teardown line");
    let last_close = log.rfind("server shutting down").expect("disconnect lines");
    assert!(last_close < down, "a worker closed a client after the network went:\n{log}");
}

#[test]
fn sighup_reaches_every_worker_and_keeps_connections() {
    let ns = Netns::new("whup");
    let dir = std::env::temp_dir().join(format!("wsnic-whup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("wsnic.conf");
    std::fs::write(&f, "workers=2\nmax_clients_per_ip=32\n").unwrap();
    let mut w = Wsnic::start(&ns, &["-c", f.to_str().unwrap()]);
    let mut a = guest_on(&ns, &mut w, 0, mac(1));
    let mut b = guest_on(&ns, &mut w, 1, mac(2));
    assert!(eventually(5 * SEC, || ns.bridge_ports("wsnicbr0").len() == 2));

    std::fs::write(&f, "workers=3\nmax_clients_per_ip=2\n").unwrap();
    w.signal("HUP");
    let log = w.wait_log("reload: configuration read again", 5 * SEC);
    assert!(log.contains("reload: workers changed but take effect only after a restart"), "{log}");
    // Two clients from 127.0.0.1 already: the new limit refuses a third, whatever the worker.
    for _ in 0..8 {
        assert_eq!(handshake_with(&ns, "/", "").0, 429);
    }
    // Both old connections are alive and served.
    for g in [&mut a, &mut b] {
        let ip = g.dhcp(1).unwrap();
        let gw = g.arp(GW);
        g.send(frames::icmp_echo(8, g.mac, gw, ip, GW, 1, 1, b"after reload"));
        assert!(g.recv_until(5 * SEC, |f| frames::icmp_of(f) == Some((GW, ip, 0, 1, 1))).is_some());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
