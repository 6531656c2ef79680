//! wss:// end to end: certificates made at test time with openssl (a test CA and a server
//! certificate for the relay's control-link address), `wsnic connect wss://… --ca`, a wrong
//! CA, and a certificate swapped by SIGHUP while an old connection keeps working.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::lab::Lab;
use support::{eventually, run_ok};

const SEC: Duration = Duration::from_secs(1);
const RELAY_IP: &str = "203.0.113.1"; // guest 0's control link

/// A CA (`NAME-ca.pem`) and a server certificate for `RELAY_IP` signed by it, in `dir`.
fn make_ca_and_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem"))
            .args(["-days", "2", "-subj", &format!("/CN={name} test CA")]),
    );
    run_ok(
        Command::new("openssl")
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(p("key.pem"))
            .arg("-out")
            .arg(p("csr.pem"))
            .args(["-subj", "/CN=relay"]),
    );
    std::fs::write(p("ext"), format!("subjectAltName=IP:{RELAY_IP}\nbasicConstraints=CA:FALSE\n")).unwrap();
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "7"])
            .arg("-in")
            .arg(p("csr.pem"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext"))
            .arg("-out")
            .arg(p("cert.pem")),
    );
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// A relay with wss:// on 8443 (and ws:// on 8070) using `cert` and `key`.
fn tls_lab(cert: &Path, key: &Path) -> Lab {
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    Lab::new(&["--wss-port", "8443", "--wss-certificate", c, "--wss-private-key", k])
}

fn wss_guest(lab: &mut Lab, ca: &Path, last_octet: u8) -> usize {
    let ca = ca.to_str().unwrap().to_string();
    let i = lab.add_guest_with(
        "wstap0",
        &format!("02:00:00:00:03:{last_octet:02x}"),
        &|ip| format!("wss://{ip}:8443/"),
        &["--ca", &ca],
    );
    let g = &lab.guests[i];
    g.ip(&["addr", "add", &format!("192.168.2.{last_octet}/24"), "dev", "wstap0"]);
    i
}

/// `wsnic connect -q wss://RELAY_IP:8443/ --tap TAP --ca CA`, to run in `ns`.
fn wss_connect(ns: &support::Netns, tap: &str, ca: &Path) -> Command {
    let mut c = ns.cmd(support::BIN);
    c.args(["connect", "-q", &format!("wss://{RELAY_IP}:8443/"), "--tap", tap, "--ca", ca.to_str().unwrap()]);
    c
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wsnic-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn wss_carries_traffic_and_a_wrong_ca_is_a_clear_error() {
    let dir = temp_dir("a");
    let (ca, cert, key) = make_ca_and_cert(&dir, "one");
    let (other_ca, _, _) = make_ca_and_cert(&dir, "other");
    let mut lab = tls_lab(&cert, &key);
    let g = wss_guest(&mut lab, &ca, 10);
    assert!(lab.ping(g, "192.168.2.1"), "no traffic over wss://: {}", lab.guest_log(g));
    lab.wsnic.as_mut().unwrap().wait_log("connected on", 5 * SEC);

    // The same relay with a CA that did not sign its certificate: one clear line, exit 1.
    let out = wss_connect(&lab.guests[g], "wstap9", &other_ca).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("certificate") && err.contains("TLS"), "{err}");
    assert!(!lab.guests[g].link_exists("wstap9"));
    // The relay says why, too: the usual wss:// setup problem should not hide in debug output.
    lab.wsnic.as_mut().unwrap().wait_log("TLS handshake failed", 5 * SEC);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sighup_swaps_the_certificate_for_new_connections() {
    let dir = temp_dir("b");
    let (ca1, cert1, key1) = make_ca_and_cert(&dir, "first");
    let (ca2, cert2, key2) = make_ca_and_cert(&dir, "second");
    let (cert, key) = (dir.join("live-cert.pem"), dir.join("live-key.pem"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let mut lab = tls_lab(&cert, &key);
    let old = wss_guest(&mut lab, &ca1, 10);
    assert!(lab.ping(old, "192.168.2.1"));

    // A broken new file keeps the old certificate…
    std::fs::write(&cert, "not a certificate").unwrap();
    lab.wsnic.as_ref().unwrap().signal("HUP");
    lab.wsnic.as_mut().unwrap().wait_log("keeping the current certificate", 5 * SEC);
    // …a good one replaces it for new connections.
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    lab.wsnic.as_ref().unwrap().signal("HUP");
    lab.wsnic.as_mut().unwrap().wait_log("TLS certificate", 5 * SEC);

    let probe =
        |ca: &Path| wss_connect(&lab.guests[old], "probe0", ca).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // With the new CA a new connection succeeds (its TAP appears and stays)…
    let mut ok = probe(&ca2);
    assert!(eventually(5 * SEC, || lab.guests[old].link_exists("probe0")), "new CA refused");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ok.try_wait().unwrap().is_none(), "the new-CA connection ended");
    let _ = Command::new("kill").args(["-TERM", &ok.id().to_string()]).status();
    let _ = ok.wait();
    // …with the old CA it fails…
    let out = probe(&ca1).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    // …and the connection made before the swap still carries traffic.
    assert!(lab.ping(old, "192.168.2.1"), "the old connection broke");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_certificate_stops_the_start_with_a_clear_error() {
    let dir = temp_dir("c");
    let (_, cert, _) = make_ca_and_cert(&dir, "mismatch");
    let (_, _, other_key) = make_ca_and_cert(&dir, "otherkey");
    let ns = support::Netns::new("badcert");
    for (c, k, want) in [
        (dir.join("missing.pem"), other_key.clone(), "missing.pem"),
        (cert.clone(), other_key.clone(), "does the key belong to the certificate"),
    ] {
        let out = ns
            .cmd(support::BIN)
            .args([
                "--wss-port",
                "8443",
                "--wss-certificate",
                c.to_str().unwrap(),
                "--wss-private-key",
                k.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
        assert!(!ns.link_exists("wsnicbr0"), "the network was touched");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
