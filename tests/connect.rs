//! `wsnic connect` end to end: guest namespaces joined to a relay's LAN by `wsnic connect`,
//! exercised with real tools — ping, iperf3, curl — and a relay restart.
//!
//! The topology is `support::lab`; the guests here use static addresses on the relay's LAN
//! 192.168.2.0/24 (tests/dhcp.rs covers DHCP).

mod support;

use std::time::Duration;

use support::lab::Lab;
use support::{eventually, iperf_mbit, Netns};

const SEC: Duration = Duration::from_secs(1);

#[test]
fn guests_ping_the_gateway_and_each_other() {
    let mut lab = Lab::new(&[]);
    lab.add_static_guest(10);
    lab.add_static_guest(11);
    assert!(lab.ping(0, "192.168.2.1"), "guest → gateway: {}", lab.guest_log(0));
    assert!(lab.ping(0, "192.168.2.11"), "guest → guest");
    assert!(lab.ping(1, "192.168.2.10"), "guest → guest");
    assert!(lab.ping(1, "198.51.100.1"), "guest → uplink peer through NAT");
}

#[test]
fn iperf3_to_the_gateway_and_through_nat() {
    // The egress policy keeps clients off the host's ports; this test measures the relay.
    let mut lab = Lab::new(&["--egress-policy", "false"]);
    lab.add_static_guest(10);
    let g = &lab.guests[0];
    lab.relay.spawn("iperf3", &["-s", "-B", "192.168.2.1"], &lab.logs.join("iperf-gw.log"));
    lab.upl.spawn("iperf3", &["-s", "-B", "198.51.100.1"], &lab.logs.join("iperf-up.log"));
    assert!(lab.ping(0, "192.168.2.1"));
    std::thread::sleep(Duration::from_millis(200)); // iperf3 servers listening
    let gw_up = iperf_mbit(g, "192.168.2.1", 2, false);
    let gw_down = iperf_mbit(g, "192.168.2.1", 2, true);
    let nat_up = iperf_mbit(g, "198.51.100.1", 2, false);
    let nat_down = iperf_mbit(g, "198.51.100.1", 2, true);
    println!("iperf3 Mbit/s: guest→gateway {gw_up:.0}, gateway→guest {gw_down:.0}, guest→uplink {nat_up:.0}, uplink→guest {nat_down:.0}");
}

#[test]
fn curl_a_page_on_the_uplink() {
    let mut lab = Lab::new(&[]);
    lab.add_static_guest(10);
    let site = lab.logs.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello from the uplink\n").unwrap();
    let dir = site.to_str().unwrap();
    lab.upl.spawn(
        "python3",
        &["-m", "http.server", "8080", "--bind", "198.51.100.1", "--directory", dir],
        &lab.logs.join("http.log"),
    );
    let g = &lab.guests[0];
    let mut body = String::new();
    let ok = eventually(10 * SEC, || {
        let out = g.exec("curl", &["-sf", "--max-time", "3", "http://198.51.100.1:8080/"]);
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(ok, "curl failed: {}", lab.guest_log(0));
    assert_eq!(body, "hello from the uplink\n");
}

#[test]
fn relay_restart_keeps_the_guest() {
    let mut lab = Lab::new(&[]);
    lab.add_static_guest(10);
    assert!(lab.ping(0, "192.168.2.1"));
    let tap_before = lab.guests[0].ip(&["-o", "link", "show", "wstap0"]);
    assert_eq!(lab.wsnic.take().unwrap().stop(), 0);
    lab.start_relay();
    let resumed =
        eventually(30 * SEC, || lab.guests[0].exec("ping", &["-c", "1", "-W", "1", "192.168.2.1"]).status.success());
    assert!(resumed, "traffic did not resume: {}", lab.guest_log(0));
    let log = lab.guest_log(0);
    assert!(log.contains("reconnecting in") && log.matches("connected to").count() >= 2, "{log}");
    // Same device (ifindex, MAC, address): nothing in the guest was touched.
    assert_eq!(lab.guests[0].ip(&["-o", "link", "show", "wstap0"]).split(':').next(), tap_before.split(':').next());
    assert!(lab.guests[0].ip(&["addr", "show", "wstap0"]).contains("192.168.2.10/24"));
}

#[test]
fn sigterm_removes_the_tap() {
    let mut lab = Lab::new(&[]);
    lab.add_static_guest(10);
    assert!(lab.ping(0, "192.168.2.1"));
    let pid = lab.connect_pids[0].to_string();
    support::run_ok(std::process::Command::new("kill").args(["-TERM", &pid]));
    assert!(eventually(5 * SEC, || !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))));
    assert!(!lab.guests[0].link_exists("wstap0"), "TAP left behind");
    assert!(lab.guest_log(0).contains("removing wstap0"));
    // The relay saw a clean close (1001 going away), not a dropped TCP connection.
    let w = lab.wsnic.as_mut().unwrap();
    w.wait_log("client closed (1001)", 5 * SEC);
}

#[test]
fn connect_errors_are_one_line() {
    let g = Netns::new("cerr");
    let run = |args: &[&str]| {
        let out = g.cmd(support::BIN).arg("connect").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["http://x/"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("bad URL"), "{err}");
    let (code, err) = run(&["-q", "ws://127.0.0.1:9/"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot connect to 127.0.0.1:9") && err.contains("refused"), "{err}");
    let (code, err) = run(&["--mac", "01:00:5e:00:00:01", "ws://127.0.0.1:9/"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unicast"), "{err}");
    // A handshake refused: show the HTTP status and reason (a plain web server answers 200).
    let relay = Netns::new("crefuse");
    relay.spawn(
        "python3",
        &["-m", "http.server", "8070", "--bind", "127.0.0.1"],
        &std::env::temp_dir().join(format!("{}.http.log", relay.name)),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = relay.cmd(support::BIN).args(["connect", "-q", "ws://127.0.0.1:8070/"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("handshake refused by 127.0.0.1:8070: 200 OK"), "{err}");
    assert!(!relay.link_exists("wstap0"), "the TAP is removed on exit");
}
