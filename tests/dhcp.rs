//! The built-in DHCP server with real clients — busybox udhcpc, ISC dhclient, dhcpcd — each
//! in a guest namespace joined by `wsnic connect`; and the pool's behaviour under churn and
//! exhaustion, driven by WebSocket guests sending DHCP by hand.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use support::lab::Lab;
use support::{eventually, frames, Guest, Netns, Wsnic};

const SEC: Duration = Duration::from_secs(1);

/// Relay options that make every client's answer checkable, with leases short enough to see
/// a renewal (T1 = 10 s).
fn relay_args(lease_file: &Path) -> Vec<String> {
    [
        "--dhcp-lease-time",
        "20",
        "--dhcp-mtu",
        "1400",
        "--dhcp-domain-name-server",
        "198.51.100.53",
        "--dhcp-domain-name",
        "lab.test",
        "--dhcp-lease-file",
        lease_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn lab_with_leases() -> (Lab, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("wsnic-dhcp-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let leases = dir.join("leases");
    let args = relay_args(&leases);
    let lab = Lab::new(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (lab, leases)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Wait for a line of `events` containing all of `needles`; return it.
fn wait_event(events: &Path, needles: &[&str], timeout: Duration) -> String {
    let mut found = String::new();
    let ok = eventually(timeout, || {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        match text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            Some(l) => {
                found = l.to_string();
                true
            }
            None => false,
        }
    });
    assert!(ok, "no event with {needles:?} in:\n{}", std::fs::read_to_string(events).unwrap_or_default());
    found
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn lease_file_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What every client must have been told.
fn assert_options(event: &str) {
    for want in ["192.168.2.1", "198.51.100.53", "1400", "lab.test"] {
        assert!(event.contains(want), "{want} missing from {event}");
    }
}

fn ip_of(event: &str, key: &str) -> String {
    event.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_default().to_string()
}

#[test]
fn busybox_udhcpc_binds_renews_releases() {
    let (mut lab, leases) = lab_with_leases();
    let g = lab.add_guest("udh0", "02:00:00:00:02:01");
    let events = lab.logs.join("udhcpc.events");
    let script = lab.logs.join("udhcpc.sh");
    write_script(
        &script,
        &format!(
            "echo \"$1 ip=$ip router=$router dns=$dns mtu=$mtu domain=$domain lease=$lease\" >> {ev}\n\
             case \"$1\" in bound|renew) ip addr replace \"$ip/$mask\" dev \"$interface\";; deconfig) ip addr flush dev \"$interface\";; esac\n",
            ev = events.display()
        ),
    );
    let pid = lab.guests[g].spawn(
        "busybox",
        &[
            "udhcpc",
            "-f",
            "-i",
            "udh0",
            "-s",
            script.to_str().unwrap(),
            "-t",
            "5",
            "-T",
            "1",
            "-x",
            "hostname:udhcpc-guest",
        ],
        &lab.logs.join("udhcpc.log"),
    );
    let bound = wait_event(&events, &["bound", "ip="], 15 * SEC);
    assert_options(&bound);
    let ip = ip_of(&bound, "ip=");
    assert!(ip.starts_with("192.168.2."), "{bound}");
    assert!(eventually(5 * SEC, || lease_file_text(&leases).contains(&ip)), "lease file: {}", lease_file_text(&leases));
    assert!(lease_file_text(&leases).contains("udhcpc-guest"), "host name kept: {}", lease_file_text(&leases));
    let renew = wait_event(&events, &["renew", "ip="], 25 * SEC);
    assert_eq!(ip_of(&renew, "ip="), ip);
    assert!(lab.ping(g, "192.168.2.1"));
    // SIGUSR2: release the lease.
    support::run_ok(std::process::Command::new("kill").args(["-USR2", &pid.to_string()]));
    assert!(
        eventually(10 * SEC, || !lease_file_text(&leases).contains(&ip)),
        "not released: {}",
        lease_file_text(&leases)
    );
}

#[test]
fn isc_dhclient_binds_renews_releases() {
    let (mut lab, leases) = lab_with_leases();
    let g = lab.add_guest("dhc0", "02:00:00:00:02:02");
    let d = &lab.logs;
    let events = d.join("dhclient.events");
    let script = d.join("dhclient.sh");
    write_script(
        &script,
        &format!(
            "echo \"$reason ip=$new_ip_address router=$new_routers dns=$new_domain_name_servers mtu=$new_interface_mtu domain=$new_domain_name\" >> {ev}\n\
             case \"$reason\" in BOUND|RENEW|REBIND|REBOOT) ip addr replace \"$new_ip_address/$new_subnet_mask\" dev \"$interface\";; esac\n",
            ev = events.display()
        ),
    );
    let conf = d.join("dhclient.conf");
    std::fs::write(
        &conf,
        "request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, interface-mtu;\n",
    )
    .unwrap();
    let files: Vec<String> = ["-sf", "-cf", "-lf", "-pf"]
        .iter()
        .zip([script.clone(), conf, d.join("dhclient.leases"), d.join("dhclient.pid")])
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect();
    let mut args: Vec<&str> = vec!["-d", "-v"];
    args.extend(files.iter().map(String::as_str));
    args.push("dhc0");
    lab.guests[g].spawn("dhclient", &args, &d.join("dhclient.log"));
    let bound = wait_event(&events, &["BOUND", "ip=192.168.2."], 20 * SEC);
    assert_options(&bound);
    let ip = ip_of(&bound, "ip=");
    let renew = wait_event(&events, &["RENEW", "ip="], 25 * SEC);
    assert_eq!(ip_of(&renew, "ip="), ip);
    // dhclient -r: release, using the running client's pid file.
    let mut rel = vec!["-r"];
    rel.extend(files.iter().map(String::as_str));
    rel.push("dhc0");
    let out = lab.guests[g].exec("dhclient", &rel);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        eventually(10 * SEC, || !lease_file_text(&leases).contains(&ip)),
        "not released: {}",
        lease_file_text(&leases)
    );
}

#[test]
fn dhcpcd_binds_renews_releases() {
    let (mut lab, leases) = lab_with_leases();
    let g = lab.add_guest("dcd0", "02:00:00:00:02:03");
    let d = &lab.logs;
    let events = d.join("dhcpcd.events");
    let script = d.join("dhcpcd.sh");
    write_script(
        &script,
        &format!(
            "echo \"$reason ip=$new_ip_address router=$new_routers dns=$new_domain_name_servers mtu=$new_interface_mtu domain=$new_domain_name\" >> {ev}\n",
            ev = events.display()
        ),
    );
    let conf = d.join("dhcpcd.conf");
    std::fs::write(
        &conf,
        "option interface_mtu, domain_name_servers, domain_name, routers, subnet_mask\nnoipv4ll\nnoipv6rs\n",
    )
    .unwrap();
    let (conf, script) = (conf.display().to_string(), script.display().to_string());
    lab.guests[g].spawn(
        "dhcpcd",
        &["-B", "-4", "-d", "-f", &conf, "-c", &script, "-t", "20", "dcd0"],
        &d.join("dhcpcd.log"),
    );
    let bound = wait_event(&events, &["BOUND", "ip=192.168.2."], 30 * SEC);
    assert_options(&bound);
    let ip = ip_of(&bound, "ip=");
    assert!(eventually(5 * SEC, || lease_file_text(&leases).contains(&ip)), "lease file: {}", lease_file_text(&leases));
    let renew = wait_event(&events, &["RENEW", "ip="], 30 * SEC);
    assert_eq!(ip_of(&renew, "ip="), ip);
    let out = lab.guests[g].exec("dhcpcd", &["-4", "-f", &conf, "-k", "dcd0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        eventually(10 * SEC, || !lease_file_text(&leases).contains(&ip)),
        "not released: {}",
        lease_file_text(&leases)
    );
}

fn guest_mac(n: u32) -> [u8; 6] {
    [0x02, 0x10, (n >> 16) as u8, (n >> 8) as u8, n as u8, 0x01]
}

fn close(mut g: Guest) {
    let _ = g.ws.close(None);
    while g.ws.read().is_ok() {}
}

#[test]
fn two_clients_get_different_addresses_and_a_reconnect_keeps_its_own() {
    let ns = Netns::new("dhcp2");
    let _w = Wsnic::start(&ns, &[]);
    let mut a = Guest::connect(&ns, guest_mac(1), Ipv4Addr::UNSPECIFIED);
    let mut b = Guest::connect(&ns, guest_mac(2), Ipv4Addr::UNSPECIFIED);
    let ip_a = a.dhcp(11).expect("a");
    let ip_b = b.dhcp(12).expect("b");
    assert_ne!(ip_a, ip_b);
    assert!(ip_a.octets()[..3] == [192, 168, 2] && ip_a.octets()[3] > 1);
    // The reply went only to the asker: b never sees a's exchange (it reads nothing DHCP).
    assert!(b.recv_until(Duration::from_millis(300), |f| frames::dhcp_reply(f, 11).is_some()).is_none());
    close(a);
    let mut again = Guest::connect(&ns, guest_mac(1), Ipv4Addr::UNSPECIFIED);
    assert_eq!(again.dhcp(13), Some(ip_a), "a reconnect within the grace period gets its address back");
}

/// The original leaked one address per page load (v86 picks a new random MAC each time).
#[test]
fn a_thousand_connections_with_fresh_macs_never_exhaust_a_24() {
    let ns = Netns::new("churn");
    let w = Wsnic::start(&ns, &[]);
    for n in 0..1000u32 {
        let mut g = Guest::connect(&ns, guest_mac(n), Ipv4Addr::UNSPECIFIED);
        assert!(
            g.dhcp(n + 1).is_some(),
            "connection {n} got no address:\n{}",
            w.log_text().lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        close(g);
    }
    assert!(!w.log_text().contains("exhausted"));
}

#[test]
fn one_connection_flooding_fake_macs_holds_one_address() {
    let ns = Netns::new("flood");
    // With anti-spoofing (the default) the fake MACs never get past the MAC lock; this checks
    // the DHCP engine's own defence, for relays that turn anti-spoofing off.
    let _w = Wsnic::start(&ns, &["--bridge-subnet", "192.168.2.0/29", "--anti-spoofing", "false"]); // 5 client addresses
    let mut g = Guest::connect(&ns, guest_mac(100), Ipv4Addr::UNSPECIFIED);
    for n in 0..50u32 {
        g.mac = guest_mac(1000 + n);
        assert!(g.dhcp(500 + n).is_some(), "fake MAC {n} got nothing");
    }
    let mut others: Vec<Guest> =
        (0..4u32).map(|n| Guest::connect(&ns, guest_mac(200 + n), Ipv4Addr::UNSPECIFIED)).collect();
    for (n, o) in others.iter_mut().enumerate() {
        assert!(o.dhcp(900 + n as u32).is_some(), "the flood took the pool: guest {n} got nothing");
    }
}

#[test]
fn exhaustion_with_everyone_connected_warns_once() {
    let ns = Netns::new("exhaust");
    let mut w = Wsnic::start(&ns, &["--bridge-subnet", "192.168.2.0/29"]);
    let mut held: Vec<Guest> =
        (0..5u32).map(|n| Guest::connect(&ns, guest_mac(300 + n), Ipv4Addr::UNSPECIFIED)).collect();
    for (n, g) in held.iter_mut().enumerate() {
        assert!(g.dhcp(700 + n as u32).is_some());
    }
    let mut late = Guest::connect(&ns, guest_mac(399), Ipv4Addr::UNSPECIFIED);
    for xid in 0..3 {
        assert_eq!(late.dhcp(800 + xid), None, "an OFFER from an exhausted pool");
    }
    let log = w.wait_log("exhausted", 5 * SEC);
    assert_eq!(log.matches("exhausted").count(), 1, "{log}");
    // Someone leaves: the late guest gets the address (the leaver's grace is a courtesy).
    close(held.pop().unwrap());
    assert!(eventually(5 * SEC, || late.dhcp(850).is_some()));
}

#[test]
fn lease_file_survives_restart_and_kill_9() {
    let ns = Netns::new("leasef");
    let dir = std::env::temp_dir().join(format!("wsnic-leasef-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("leases");
    let args = ["--dhcp-lease-file", file.to_str().unwrap()];
    let mut w = Wsnic::start(&ns, &args);
    let mut a = Guest::connect(&ns, guest_mac(42), Ipv4Addr::UNSPECIFIED);
    let ip = a.dhcp(1).unwrap();
    drop(a);
    assert!(eventually(5 * SEC, || lease_file_text(&file).contains(&ip.to_string())), "lease written");
    // Churn leases while the server is killed: the file is never torn.
    let ns_name = ns.name.clone();
    let churn = std::thread::spawn(move || {
        let ns = Netns::attach(&ns_name);
        for n in 0..200u32 {
            let Some(mut g) = Guest::try_connect(&ns, guest_mac(5000 + n)) else { break };
            if g.dhcp(9000 + n).is_none() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    w.signal("KILL");
    w.wait_exit();
    let _ = churn.join();
    let log = w.log.clone();
    drop(w);
    let mut w = Wsnic::start_logging(&ns, &args, log);
    w.wait_log("DHCP leases from", 5 * SEC);
    let mut back = Guest::connect(&ns, guest_mac(42), Ipv4Addr::UNSPECIFIED);
    assert_eq!(back.dhcp(2), Some(ip), "the lease came back from the file");
    drop(back);
    assert_eq!(w.stop(), 0);
    // A corrupt file stops the next start, naming the file, before the network is touched.
    std::fs::write(&file, "this is not a lease file\n").unwrap();
    let out = ns.cmd(support::BIN).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(!ns.link_exists("wsnicbr0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lease writer rewrites the file within about a second of a change, off the event loop,
/// and once more at exit: a lease released just before SIGTERM is gone from the file after it.
#[test]
fn lease_file_is_written_within_a_second_and_at_exit() {
    let ns = Netns::new("leasew");
    let dir = std::env::temp_dir().join(format!("wsnic-leasew-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("leases");
    let w = Wsnic::start(&ns, &["--dhcp-lease-file", file.to_str().unwrap()]);
    let mut g = Guest::connect(&ns, guest_mac(77), Ipv4Addr::UNSPECIFIED);
    let ip = g.dhcp(1).unwrap();
    assert!(eventually(5 * SEC, || lease_file_text(&file).contains(&ip.to_string())), "lease written");
    let gw = Some(Ipv4Addr::new(192, 168, 2, 1));
    g.send(frames::dhcp_client(7, g.mac, 2, None, gw, ip));
    // A DISCOVER answered after the RELEASE on the same connection: the RELEASE was handled.
    g.send(frames::dhcp_client(1, g.mac, 3, None, None, Ipv4Addr::UNSPECIFIED));
    assert!(g.recv_until(5 * SEC, |f| frames::dhcp_reply(f, 3).is_some()).is_some(), "no OFFER");
    assert_eq!(w.stop(), 0);
    let text = lease_file_text(&file);
    assert!(!text.contains(&ip.to_string()), "the release was written at exit: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
