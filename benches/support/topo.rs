//! The benchmark's topology and settings: `tests/support/lab.rs`'s namespaces (relay with an
//! uplink peer, guests joined by `wsnic connect`) with the relay run at normal verbosity (the
//! lab's own runs with `-v`, whose debug lines would be part of what is measured), the
//! `WSNIC_BENCH_*` environment, and clean-up of the namespaces on panic and on Ctrl-C.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::test_support::lab::Lab;
use crate::test_support::{Netns, BIN};

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

/// Namespaces to remove if the benchmark is interrupted (Ctrl-C, SIGTERM): Drop does not run then.
static LIVE_NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// On SIGINT/SIGTERM: end everything running in our namespaces, delete them, exit 130.
pub fn clean_up_on_signal() {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM]).expect("signal handler");
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("interrupted: removing the benchmark's namespaces");
            let names = LIVE_NAMESPACES.lock().map(|n| n.clone()).unwrap_or_default();
            for name in &names {
                let out = Command::new("ip").args(["netns", "pids", name]).output();
                let pids = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-TERM", pid]).status();
                }
            }
            std::thread::sleep(Duration::from_secs(3));
            for name in &names {
                let out = Command::new("ip").args(["netns", "pids", name]).output();
                let pids = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
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

/// A wsnic relay process in a namespace, at normal verbosity; SIGTERM on drop.
pub struct RelayProc {
    child: Child,
    pub log: PathBuf,
}

impl RelayProc {
    pub fn start(ns: &Netns, args: &[String], log: PathBuf) -> RelayProc {
        let f = std::fs::File::create(&log).unwrap();
        let child = ns
            .cmd(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
        let mut r = RelayProc { child, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !r.log_text().contains("listening on") {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("wsnic did not start ({st}), args {args:?}:\n{}", r.log_text());
            }
            assert!(Instant::now() < deadline, "wsnic did not start within 15 s, args {args:?}:\n{}", r.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// The relay's pid (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Panic with the log if the relay has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("wsnic exited ({st}):\n{}", self.log_text());
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60); // hundreds of TAPs take a while
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The lab (relay namespace + uplink peer namespace, guests added on demand) with a relay of
/// our own. Dropped: relay first (SIGTERM, clean exit), then the namespaces.
pub struct Topo {
    relay: Option<RelayProc>,
    pub lab: Lab,
    pub settings: Settings,
}

impl Topo {
    pub fn new(settings: &Settings) -> Topo {
        let mut lab = Lab::new(&[]);
        track(&lab.relay);
        track(&lab.upl);
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
        self.relay = Some(RelayProc::start(&self.lab.relay, &self.settings.relay_argv(), log));
    }

    pub fn relay(&mut self) -> &mut RelayProc {
        self.relay.as_mut().expect("relay running")
    }

    pub fn relay_pid(&self) -> u32 {
        self.relay.as_ref().expect("relay running").pid()
    }

    /// Name of the relay's namespace.
    pub fn ns(&self) -> String {
        self.lab.relay.name.clone()
    }

    /// The bridge's MAC, as the relay set it.
    pub fn bridge_mac(&self) -> [u8; 6] {
        let out = self.lab.relay.exec("cat", &["/sys/class/net/wsnicbr0/address"]);
        let text = String::from_utf8_lossy(&out.stdout);
        parse_mac(text.trim()).unwrap_or_else(|| panic!("no MAC for wsnicbr0: {text:?}"))
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
                Some((parse_mac(w.first()?)?, dev.to_string()))
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

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).collect();
    v.try_into().ok()
}

/// Raise this process's open-file limit to its hard limit (1000 clients are 1000 sockets).
pub fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
