//! `wsnic connect` end to end: guest namespaces joined to a relay's LAN by `wsnic connect`,
//! exercised with real tools — ping, iperf3, curl — and a relay restart.
//!
//! Topology (every namespace made here):
//! ```text
//!  guest1 ─ctl veth 203.0.113.0/30─┐                     ┌─ uplink veth 198.51.100.0/24 ─ upl (iperf3, http)
//!  guest2 ─ctl veth 203.0.113.4/30─┴─ relay (wsnic, br) ─┘
//! ```
//! The guests' `wstap0` are on the relay's LAN 192.168.2.0/24 (static addresses: DHCP is a
//! later piece).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{eventually, Netns, Wsnic};

const SEC: Duration = Duration::from_secs(1);

struct Lab {
    relay: Netns,
    upl: Netns,
    guests: Vec<Netns>,
    /// pid of each guest's `wsnic connect`.
    connect_pids: Vec<u32>,
    wsnic: Option<Wsnic>,
    logs: PathBuf,
}

impl Lab {
    fn new(guests: usize) -> Lab {
        let relay = Netns::new("relay");
        let upl = Netns::new("upl");
        relay.veth("uplink0", &upl, "peer0");
        relay.ip(&["addr", "add", "198.51.100.2/24", "dev", "uplink0"]);
        relay.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        upl.ip(&["addr", "add", "198.51.100.1/24", "dev", "peer0"]);
        let logs = std::env::temp_dir().join(format!("wsnic-connect-{}", relay.name));
        std::fs::create_dir_all(&logs).unwrap();
        let mut lab = Lab { relay, upl, guests: Vec::new(), connect_pids: Vec::new(), wsnic: None, logs };
        lab.start_relay();
        for i in 0..guests {
            lab.add_guest(i);
        }
        lab
    }

    fn start_relay(&mut self) {
        let log = self.logs.join("relay.log");
        self.wsnic = Some(Wsnic::start_logging(&self.relay, &["--ws-server-addr", "0.0.0.0"], log));
    }

    /// Guest i: control link 203.0.113.4i/30, `wsnic connect` to the relay, 192.168.2.(10+i).
    fn add_guest(&mut self, i: usize) {
        let g = Netns::new(&format!("g{i}"));
        let (r_ip, g_ip) = (format!("203.0.113.{}", 4 * i + 1), format!("203.0.113.{}", 4 * i + 2));
        let ctl = format!("ctl{i}");
        self.relay.veth(&ctl, &g, "ctl0");
        self.relay.ip(&["addr", "add", &format!("{r_ip}/30"), "dev", &ctl]);
        g.ip(&["addr", "add", &format!("{g_ip}/30"), "dev", "ctl0"]);
        let mac = format!("02:00:00:00:01:{:02x}", 10 + i);
        let url = format!("ws://{r_ip}:8070/");
        let pid = g.spawn(
            support::BIN,
            &["connect", &url, "--tap", "wstap0", "--mac", &mac],
            &self.logs.join(format!("g{i}.log")),
        );
        assert!(eventually(10 * SEC, || g.link_exists("wstap0")), "no TAP in guest {i}: {}", self.guest_log(i));
        g.ip(&["addr", "add", &format!("192.168.2.{}/24", 10 + i), "dev", "wstap0"]);
        g.ip(&["route", "add", "default", "via", "192.168.2.1"]);
        self.guests.push(g);
        self.connect_pids.push(pid);
    }

    fn guest_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.logs.join(format!("g{i}.log"))).unwrap_or_default()
    }

    fn ping(&self, from: usize, to: &str) -> bool {
        self.guests[from].exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", to]).status.success()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The relay first (SIGTERM, clean exit), before its namespace goes.
        drop(self.wsnic.take());
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// `iperf3 -c SERVER [-R]` from `ns`; returns the received rate in Mbit/s.
fn iperf(ns: &Netns, server: &str, reverse: bool) -> f64 {
    let mut args = vec!["-c", server, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let out = ns.exec("iperf3", &args);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iperf3 {args:?} failed: {json}");
    let recv = json.split("\"sum_received\"").nth(1).expect("sum_received");
    let bps: f64 =
        recv.split("\"bits_per_second\":").nth(1).unwrap().split([',', '}']).next().unwrap().trim().parse().unwrap();
    assert!(bps > 0.0);
    bps / 1e6
}

#[test]
fn guests_ping_the_gateway_and_each_other() {
    let lab = Lab::new(2);
    assert!(lab.ping(0, "192.168.2.1"), "guest → gateway: {}", lab.guest_log(0));
    assert!(lab.ping(0, "192.168.2.11"), "guest → guest");
    assert!(lab.ping(1, "192.168.2.10"), "guest → guest");
    assert!(lab.ping(1, "198.51.100.1"), "guest → uplink peer through NAT");
}

#[test]
fn iperf3_to_the_gateway_and_through_nat() {
    let lab = Lab::new(1);
    let g = &lab.guests[0];
    lab.relay.spawn("iperf3", &["-s", "-B", "192.168.2.1"], &lab.logs.join("iperf-gw.log"));
    lab.upl.spawn("iperf3", &["-s", "-B", "198.51.100.1"], &lab.logs.join("iperf-up.log"));
    assert!(lab.ping(0, "192.168.2.1"));
    std::thread::sleep(Duration::from_millis(200)); // iperf3 servers listening
    let gw_up = iperf(g, "192.168.2.1", false);
    let gw_down = iperf(g, "192.168.2.1", true);
    let nat_up = iperf(g, "198.51.100.1", false);
    let nat_down = iperf(g, "198.51.100.1", true);
    println!("iperf3 Mbit/s: guest→gateway {gw_up:.0}, gateway→guest {gw_down:.0}, guest→uplink {nat_up:.0}, uplink→guest {nat_down:.0}");
}

#[test]
fn curl_a_page_on_the_uplink() {
    let lab = Lab::new(1);
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
    let mut lab = Lab::new(1);
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
    let mut lab = Lab::new(1);
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
