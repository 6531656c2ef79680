//! TAP offload end to end: a relay with `tap_offload=true` and guests joined by
//! `wsnic connect --offload`, so super-frames are cut into real frames and TCP segments merged
//! on both sides of the WebSocket. Data crosses intact both ways (SHA-256 of 16 MiB each way),
//! the kernels on both sides really exchanged super-frames (TAP counters far below the number
//! of Ethernet frames), and ARP, ICMP and DHCP are unaffected; either side may have offload off.

mod support;

use std::time::Duration;

use support::lab::Lab;
use support::{eventually, Netns};

const SEC: Duration = Duration::from_secs(1);
const MIB16: usize = 16 << 20;

/// A TAP's kernel counter (`rx_packets`, `tx_packets`, ...).
fn counter(ns: &Netns, dev: &str, name: &str) -> u64 {
    let out = ns.exec("cat", &[&format!("/sys/class/net/{dev}/statistics/{name}")]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("{dev} {name}"))
}

/// Python: serve once on `addr:port`; `recv` hashes what it receives, `send` sends `n` random
/// bytes; either way the SHA-256 goes to `out`.
fn peer_script(role: &str, addr: &str, port: u16, n: usize, out: &str) -> String {
    format!(
        r#"
import socket, hashlib, os
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{addr}", {port})); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256()
if "{role}" == "recv":
    while True:
        b = c.recv(1 << 16)
        if not b: break
        h.update(b)
else:
    data = os.urandom({n}); h.update(data); c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)
open("{out}", "w").write(h.hexdigest())
"#
    )
}

/// Python: connect to `addr:port`; `send` sends `n` random bytes, `recv` hashes what comes.
fn guest_script(role: &str, addr: &str, port: u16, n: usize) -> String {
    format!(
        r#"
import socket, hashlib, os, sys, time
for _ in range(50):
    try:
        c = socket.create_connection(("{addr}", {port}), timeout=10); break
    except OSError: time.sleep(0.1)
h = hashlib.sha256()
if "{role}" == "send":
    data = os.urandom({n}); h.update(data); c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)
else:
    while True:
        b = c.recv(1 << 16)
        if not b: break
        h.update(b)
print(h.hexdigest())
"#
    )
}

/// Move 16 MiB from the guest to the uplink peer (`up`) or back, and compare the hashes.
fn transfer(lab: &Lab, up: bool, port: u16) {
    let out = lab.logs.join(format!("sha-{port}"));
    let out = out.to_str().unwrap();
    let (peer_role, guest_role) = if up { ("recv", "send") } else { ("send", "recv") };
    lab.upl.spawn(
        "python3",
        &["-c", &peer_script(peer_role, "198.51.100.1", port, MIB16, out)],
        &lab.logs.join("peer.log"),
    );
    let r = lab.guests[0].exec("python3", &["-c", &guest_script(guest_role, "198.51.100.1", port, MIB16)]);
    assert!(r.status.success(), "guest: {}", String::from_utf8_lossy(&r.stderr));
    let guest_sha = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(eventually(10 * SEC, || std::fs::read_to_string(out).is_ok_and(|s| s.len() == 64)));
    let peer_sha = std::fs::read_to_string(out).unwrap();
    assert_eq!(guest_sha, peer_sha, "data changed on the way ({})", if up { "up" } else { "down" });
}

#[test]
fn offload_both_sides_moves_data_intact_in_super_frames() {
    let mut lab = Lab::new(&["--tap-offload", "true"]);
    lab.add_guest_with("wstap0", "02:00:00:00:01:0a", &|ip| format!("ws://{ip}:8070/"), &["--offload"]);
    let g = &lab.guests[0];
    g.ip(&["addr", "add", "192.168.2.10/24", "dev", "wstap0"]);
    g.ip(&["route", "add", "default", "via", "192.168.2.1"]);
    assert!(lab.ping(0, "192.168.2.1"), "ARP and ICMP to the gateway: {}", lab.guest_log(0));
    assert!(lab.ping(0, "198.51.100.1"), "ICMP through NAT");

    let (relay_rx, relay_tx) =
        (counter(&lab.relay, "wsnic0", "rx_packets"), counter(&lab.relay, "wsnic0", "tx_packets"));
    let (guest_rx, guest_tx) = (counter(g, "wstap0", "rx_packets"), counter(g, "wstap0", "tx_packets"));
    transfer(&lab, true, 5201);
    transfer(&lab, false, 5202);
    // 16 MiB is about 11 600 full-size frames each way. Without offload every one of them is
    // one TAP write on one side and one TAP read on the other; with it, far fewer.
    let frames = (MIB16 / 1448) as u64;
    let relay_writes = counter(&lab.relay, "wsnic0", "rx_packets") - relay_rx;
    let relay_reads = counter(&lab.relay, "wsnic0", "tx_packets") - relay_tx;
    let guest_writes = counter(g, "wstap0", "rx_packets") - guest_rx;
    let guest_reads = counter(g, "wstap0", "tx_packets") - guest_tx;
    println!(
        "frames each way ≈ {frames}; TAP writes/reads: relay {relay_writes}/{relay_reads}, guest {guest_writes}/{guest_reads}"
    );
    for (what, n) in [
        ("relay merged the guest's segments", relay_writes),
        ("the relay's kernel handed over super-frames", relay_reads),
        ("the guest merged the relay's segments", guest_writes),
        ("the guest's kernel handed over super-frames", guest_reads),
    ] {
        assert!(n < frames / 3, "{what}: {n} TAP frames for ≈{frames} Ethernet frames");
    }
    let mut w = lab.wsnic.take().unwrap();
    w.signal("TERM");
    w.wait_exit();
    let log = w.log_text();
    assert!(log.contains("offload 0)"), "frames dropped by offload: {log}");
}

#[test]
fn offload_on_one_side_only() {
    for (relay, guest) in [(true, false), (false, true)] {
        let relay_args: &[&str] = if relay { &["--tap-offload", "true"] } else { &[] };
        let guest_args: &[&str] = if guest { &["--offload"] } else { &[] };
        let mut lab = Lab::new(relay_args);
        lab.add_guest_with("wstap0", "02:00:00:00:01:0a", &|ip| format!("ws://{ip}:8070/"), guest_args);
        let g = &lab.guests[0];
        g.ip(&["addr", "add", "192.168.2.10/24", "dev", "wstap0"]);
        g.ip(&["route", "add", "default", "via", "192.168.2.1"]);
        assert!(lab.ping(0, "198.51.100.1"), "relay offload {relay}, guest offload {guest}");
        transfer(&lab, true, 5201);
        transfer(&lab, false, 5202);
    }
}

#[test]
fn dhcp_and_a_second_guest_with_offload() {
    let mut lab = Lab::new(&["--tap-offload", "true"]);
    for (i, mac) in ["02:00:00:00:01:0a", "02:00:00:00:01:0b"].iter().enumerate() {
        lab.add_guest_with("wstap0", mac, &|ip| format!("ws://{ip}:8070/"), &["--offload"]);
        let g = &lab.guests[i];
        let r = g.exec("busybox", &["udhcpc", "-i", "wstap0", "-n", "-q", "-t", "5", "-T", "1", "-s", "/bin/true"]);
        assert!(r.status.success(), "udhcpc: {}", String::from_utf8_lossy(&r.stderr));
        let lease = String::from_utf8_lossy(&r.stderr).to_string() + &String::from_utf8_lossy(&r.stdout);
        let ip = lease.split("lease of ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
        g.ip(&["addr", "add", &format!("{ip}/24"), "dev", "wstap0"]);
    }
    let other = lab.guests[1].ip(&["-4", "-o", "addr", "show", "wstap0"]);
    let other = other.split("inet ").nth(1).unwrap().split('/').next().unwrap().to_string();
    assert!(lab.ping(0, &other), "guest → guest over the bridge");
}
