//! The benchmark's topology and settings: `tests/support/lab.rs`'s namespaces (relay with an
//! uplink peer, guests joined by `wsnic connect`) with the relay run at normal verbosity (the
//! lab's own runs with `-v`, whose debug lines would be part of what is measured), the
//! `WSNIC_BENCH_*` environment, and clean-up of the namespaces on panic and on Ctrl-C.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use wsnic::sys::parse_mac;

use crate::test_support::lab::Lab;
use crate::test_support::{Netns, Wsnic};

/// What the environment asks for.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Runs (measurement windows) per figure; each figure is their median.
    pub runs: usize,
    /// Seconds per run.
    pub secs: f64,
    /// Sections to run (`a`…`f`; `f` comes with `a`).
    pub only: Vec<char>,
    /// Only (a) cases whose name contains this (`WSNIC_BENCH_FILTER`, e.g. `1514 B`).
    pub filter: Option<String>,
    /// Extra relay arguments (`WSNIC_BENCH_RELAY_ARGS`).
    pub relay_args: Vec<String>,
    /// Extra `wsnic connect` arguments (`WSNIC_BENCH_CONNECT_ARGS`).
    pub connect_args: Vec<String>,
    /// `WSNIC_BENCH_UPLINK_NAPI=1`: the uplink peer receives in a NAPI thread of its own
    /// (see `uplink_peer_in_own_thread`).
    pub uplink_napi: bool,
    /// `WSNIC_BENCH_CC`: the TCP congestion control of every namespace the benchmark makes
    /// (`net.ipv4.tcp_congestion_control`); otherwise they inherit the machine's.
    pub cc: Option<String>,
}

impl Settings {
    pub fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let words = |k: &str| var(k).map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default();
        let runs = var("WSNIC_BENCH_RUNS").map(|v| v.parse().expect("WSNIC_BENCH_RUNS: a number of runs")).unwrap_or(5);
        let secs =
            var("WSNIC_BENCH_SECS").map(|v| v.parse().expect("WSNIC_BENCH_SECS: seconds per run")).unwrap_or(2.0);
        let mut only: Vec<char> = var("WSNIC_BENCH_ONLY")
            .map(|v| v.split(',').filter_map(|s| s.trim().chars().next()).map(|c| c.to_ascii_lowercase()).collect())
            .unwrap_or_else(|| "abcde".chars().collect());
        if only.contains(&'f') && !only.contains(&'a') {
            only.push('a'); // (f) is computed from (a)'s runs
        }
        assert!(runs >= 1 && secs > 0.0, "WSNIC_BENCH_RUNS must be ≥ 1 and WSNIC_BENCH_SECS > 0");
        let filter = var("WSNIC_BENCH_FILTER");
        Settings {
            runs,
            secs,
            only,
            filter,
            relay_args: words("WSNIC_BENCH_RELAY_ARGS"),
            connect_args: words("WSNIC_BENCH_CONNECT_ARGS"),
            uplink_napi: var("WSNIC_BENCH_UPLINK_NAPI").is_some_and(|v| v != "0"),
            cc: var("WSNIC_BENCH_CC").map(|v| checked_cc(v.trim())),
        }
    }

    /// How the uplink's far end receives, for the table's title.
    pub fn uplink_note(&self) -> &'static str {
        if self.uplink_napi {
            "uplink peer receives in a NAPI thread of its own (GRO on, TSO off on uplink0)"
        } else {
            "uplink peer receives in the sender's system call (veth default)"
        }
    }

    /// Which TCP congestion control the namespaces use, for the table's title.
    pub fn cc_note(&self) -> String {
        match &self.cc {
            Some(cc) => format!("TCP congestion control {cc} (`WSNIC_BENCH_CC`)"),
            None => format!("TCP congestion control {} (the machine's)", machine_cc()),
        }
    }

    pub fn wants(&self, section: char) -> bool {
        self.only.contains(&section)
    }

    pub fn wants_case(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| name.contains(f.as_str()))
    }

    /// The relay's arguments: the benchmark's base (listen on all addresses of the relay
    /// namespace, 1000 clients from one address) with `WSNIC_BENCH_RELAY_ARGS` added; a key
    /// given there replaces the base's.
    pub fn relay_argv(&self) -> Vec<String> {
        let base = [("--ws-server-addr", "0.0.0.0"), ("--max-clients", "1000"), ("--max-clients-per-ip", "1000")];
        let given = |key: &str| {
            let alt = key.replace('-', "_").replacen("__", "--", 1);
            self.relay_args.iter().any(|a| {
                let k = a.split('=').next().unwrap();
                k == key || k == alt
            })
        };
        let mut v: Vec<String> =
            base.iter().filter(|(k, _)| !given(k)).flat_map(|(k, val)| [k.to_string(), val.to_string()]).collect();
        v.extend(self.relay_args.iter().cloned());
        v
    }
}

/// `cc` if a namespace other than the machine's may choose it (`tcp_allowed_congestion_control`);
/// exits otherwise.
fn checked_cc(cc: &str) -> String {
    let have = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control").unwrap_or_default();
    if !have.split_whitespace().any(|c| c == cc) {
        eprintln!("WSNIC_BENCH_CC: {cc:?} is not in net.ipv4.tcp_allowed_congestion_control ({})", have.trim());
        std::process::exit(2);
    }
    cc.to_string()
}

/// The machine's TCP congestion control, which new namespaces inherit.
pub fn machine_cc() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Namespaces to remove if the benchmark is interrupted (Ctrl-C, SIGTERM): Drop does not run then.
static LIVE_NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// On SIGINT/SIGTERM: end everything running in our namespaces, delete them, exit 130.
pub fn clean_up_on_signal() {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM]).expect("signal handler");
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("interrupted: removing the benchmark's namespaces");
            let names = LIVE_NAMESPACES.lock().map(|n| n.clone()).unwrap_or_default();
            let kill_all = |name: &str, sig: &str| {
                let out = Command::new("ip").args(["netns", "pids", name]).output();
                let pids = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args([sig, pid]).status();
                }
            };
            for name in &names {
                kill_all(name, "-TERM");
            }
            std::thread::sleep(Duration::from_secs(3));
            for name in &names {
                kill_all(name, "-KILL");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
            std::process::exit(130);
        }
    });
}

fn track(ns: &Netns) {
    LIVE_NAMESPACES.lock().unwrap().push(ns.name.clone());
}

fn untrack(name: &str) {
    LIVE_NAMESPACES.lock().unwrap().retain(|n| n != name);
}

/// A veth delivers what the relay forwards to the uplink in the relay's own system call: the far
/// side's IP and TCP receive (the iperf3 server's, in section b) run in the relay's TAP write and
/// are charged to it, which a real uplink NIC would not do. This moves that work to a kernel
/// thread of its own, as the `others` column then shows: GRO on the peer makes veth use NAPI,
/// `threaded` runs that NAPI in a thread, and veth only hands frames to NAPI when the sending end
/// has TSO off. TSO off costs nothing for frames of MTU size, but super-frames (TAP offload) are
/// then cut at uplink0 in the relay's context, so this suits runs without offload.
fn uplink_peer_in_own_thread(lab: &Lab) {
    let run = |ns: &Netns, prog: &str, args: &[&str]| {
        let out = ns.exec(prog, args);
        assert!(
            out.status.success(),
            "WSNIC_BENCH_UPLINK_NAPI: `{prog} {}` failed (is ethtool installed?): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&lab.upl, "ethtool", &["-K", "peer0", "gro", "on"]);
    run(&lab.relay, "ethtool", &["-K", "uplink0", "tso", "off"]);
    run(&lab.upl, "sh", &["-c", "echo 1 > /sys/class/net/peer0/threaded"]);
}

/// The lab (relay namespace + uplink peer namespace, guests added on demand) with a relay of
/// our own. Dropped: relay first (SIGTERM, clean exit), then the namespaces.
pub struct Topo {
    /// The relay, at normal verbosity (SIGTERM on drop).
    relay: Option<Wsnic>,
    pub lab: Lab,
    pub settings: Settings,
}

impl Topo {
    pub fn new(settings: &Settings) -> Topo {
        let mut lab = Lab::new(&[]);
        track(&lab.relay);
        track(&lab.upl);
        if settings.uplink_napi {
            uplink_peer_in_own_thread(&lab);
        }
        if let Some(cc) = &settings.cc {
            lab.set_sysctl_everywhere("net.ipv4.tcp_congestion_control", cc);
        }
        // The lab starts its relay with -v; replace it by one at normal verbosity.
        if let Some(w) = lab.wsnic.take() {
            w.stop();
        }
        let mut t = Topo { relay: None, lab, settings: settings.clone() };
        t.restart_relay();
        t
    }

    /// Stop the relay (if running) and start a fresh one: no pooled buffers, no clients.
    pub fn restart_relay(&mut self) {
        drop(self.relay.take());
        let log = self.lab.logs.join("bench-relay.log");
        let args = self.settings.relay_argv();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.relay = Some(Wsnic::spawn(&self.lab.relay, &args, log, false));
    }

    pub fn relay(&mut self) -> &mut Wsnic {
        self.relay.as_mut().expect("relay running")
    }

    pub fn relay_pid(&self) -> u32 {
        self.relay.as_ref().expect("relay running").pid()
    }

    /// Name of the relay's namespace.
    pub fn ns(&self) -> String {
        self.lab.relay.name.clone()
    }

    /// The ifindexes of a probe veth pair created (and deleted) in the relay's namespace: (the
    /// lower, the higher). The kernel hands them out in increasing order, so
    /// `later.0 - earlier.1 - 1` devices were created between two probes.
    pub fn probe_ifindex(&self) -> (u32, u32) {
        self.lab.relay.ip(&["link", "add", "benchprobe0", "type", "veth", "peer", "name", "benchprobe1"]);
        let index = |dev: &str| -> u32 {
            let out = self.lab.relay.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")]);
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("ifindex")
        };
        let (a, b) = (index("benchprobe0"), index("benchprobe1"));
        self.lab.relay.ip(&["link", "del", "benchprobe0"]);
        (a.min(b), a.max(b))
    }

    /// The bridge's MAC, as the relay set it.
    pub fn bridge_mac(&self) -> [u8; 6] {
        let out = self.lab.relay.exec("cat", &["/sys/class/net/wsnicbr0/address"]);
        let text = String::from_utf8_lossy(&out.stdout);
        parse_mac(text.trim()).unwrap_or_else(|e| panic!("no MAC for wsnicbr0: {e}"))
    }

    /// A guest namespace joined by `wsnic connect` (with `WSNIC_BENCH_CONNECT_ARGS`) at
    /// 192.168.2.`last_octet`/24 with a default route via the gateway; returns its index.
    pub fn add_static_guest(&mut self, last_octet: u8) -> usize {
        let extra: Vec<&str> = self.settings.connect_args.iter().map(String::as_str).collect();
        let mac = format!("02:00:00:00:01:{last_octet:02x}");
        let i = self.lab.add_guest_with("wstap0", &mac, &|relay_ip| format!("ws://{relay_ip}:8070/"), &extra);
        let g = &self.lab.guests[i];
        track(g);
        g.ip(&["addr", "add", &format!("192.168.2.{last_octet}/24"), "dev", "wstap0"]);
        g.ip(&["route", "add", "default", "via", "192.168.2.1"]);
        i
    }

    /// Which TAP each client MAC is behind, from the bridge's forwarding database.
    pub fn tap_of_macs(&self) -> Vec<([u8; 6], String)> {
        let out = self.lab.relay.exec("bridge", &["fdb", "show", "br", "wsnicbr0"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.contains("permanent"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let dev = w.iter().position(|x| *x == "dev").and_then(|p| w.get(p + 1))?;
                Some((parse_mac(w.first()?).ok()?, dev.to_string()))
            })
            .collect()
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        drop(self.relay.take());
        for g in &self.lab.guests {
            untrack(&g.name);
        }
        untrack(&self.lab.relay.name);
        untrack(&self.lab.upl.name);
    }
}
