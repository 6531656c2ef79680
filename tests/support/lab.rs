//! A relay namespace with an uplink peer, and guest namespaces joined to the relay's LAN by
//! `wsnic connect`:
//! ```text
//!  guest i ─ctl veth 203.0.113.4i/30─┐                      ┌─ uplink veth 198.51.100.0/24 ─ upl
//!                                     └─ relay (wsnic, br) ─┘
//! ```

use std::path::PathBuf;
use std::time::Duration;

use super::{eventually, Netns, Wsnic, BIN};

pub struct Lab {
    pub relay: Netns,
    pub upl: Netns,
    pub guests: Vec<Netns>,
    /// pid of each guest's `wsnic connect`.
    pub connect_pids: Vec<u32>,
    pub wsnic: Option<Wsnic>,
    pub relay_args: Vec<String>,
    pub logs: PathBuf,
    /// Sysctls set in every namespace of the lab: the ones it has and each guest's before its
    /// `wsnic connect` starts ([`Lab::set_sysctl_everywhere`]).
    sysctls: Vec<(String, String)>,
}

impl Lab {
    /// A relay started with `--ws-server-addr 0.0.0.0` plus `relay_args`.
    pub fn new(relay_args: &[&str]) -> Lab {
        let relay = Netns::new("relay");
        let upl = Netns::new("upl");
        relay.veth("uplink0", &upl, "peer0");
        relay.ip(&["addr", "add", "198.51.100.2/24", "dev", "uplink0"]);
        relay.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        upl.ip(&["addr", "add", "198.51.100.1/24", "dev", "peer0"]);
        let logs = std::env::temp_dir().join(format!("wsnic-lab-{}", relay.name));
        std::fs::create_dir_all(&logs).unwrap();
        let relay_args = relay_args.iter().map(|s| s.to_string()).collect();
        let mut lab = Lab {
            relay,
            upl,
            guests: Vec::new(),
            connect_pids: Vec::new(),
            wsnic: None,
            relay_args,
            logs,
            sysctls: Vec::new(),
        };
        lab.start_relay();
        lab
    }

    pub fn start_relay(&mut self) {
        let log = self.logs.join("relay.log");
        let mut args = vec!["--ws-server-addr", "0.0.0.0"];
        args.extend(self.relay_args.iter().map(String::as_str));
        self.wsnic = Some(Wsnic::start_logging(&self.relay, &args, log));
    }

    /// Set `name` to `value` in the relay's, the uplink's and every guest's namespace, now and in
    /// each guest added later (before its `wsnic connect` starts). A TCP socket takes the
    /// namespace's congestion control when it is created or accepted, so setting that one here
    /// reaches every connection the relay accepts afterwards.
    pub fn set_sysctl_everywhere(&mut self, name: &str, value: &str) {
        for ns in [&self.relay, &self.upl].into_iter().chain(&self.guests) {
            ns.set_sysctl(name, value);
        }
        self.sysctls.push((name.to_string(), value.to_string()));
    }

    pub fn relay_log(&self) -> String {
        std::fs::read_to_string(self.logs.join("relay.log")).unwrap_or_default()
    }

    /// A new guest namespace, its control link, and `wsnic connect` creating `tap` with `mac`.
    /// Returns the guest's index.
    pub fn add_guest(&mut self, tap: &str, mac: &str) -> usize {
        self.add_guest_with(tap, mac, &|relay_ip| format!("ws://{relay_ip}:8070/"), &[])
    }

    /// Like [`Lab::add_guest`], with the URL made from the relay's address on the control link
    /// and extra `wsnic connect` arguments.
    pub fn add_guest_with(&mut self, tap: &str, mac: &str, url: &dyn Fn(&str) -> String, extra: &[&str]) -> usize {
        let i = self.guests.len();
        let g = Netns::new(&format!("g{i}"));
        for (name, value) in &self.sysctls {
            g.set_sysctl(name, value);
        }
        let (r_ip, g_ip) = (format!("203.0.113.{}", 4 * i + 1), format!("203.0.113.{}", 4 * i + 2));
        let ctl = format!("ctl{i}");
        self.relay.veth(&ctl, &g, "ctl0");
        self.relay.ip(&["addr", "add", &format!("{r_ip}/30"), "dev", &ctl]);
        g.ip(&["addr", "add", &format!("{g_ip}/30"), "dev", "ctl0"]);
        let url = url(&r_ip);
        self.guests.push(g);
        let pid = self.connect(i, &url, tap, mac, extra);
        self.connect_pids.push(pid);
        i
    }

    /// Start `wsnic connect` in guest `i` and wait for its TAP.
    pub fn connect(&self, i: usize, url: &str, tap: &str, mac: &str, extra: &[&str]) -> u32 {
        let g = &self.guests[i];
        let mut args = vec!["connect", url, "--tap", tap, "--mac", mac];
        args.extend_from_slice(extra);
        let pid = g.spawn(BIN, &args, &self.logs.join(format!("g{i}.log")));
        assert!(
            eventually(Duration::from_secs(10), || g.link_exists(tap)),
            "no TAP in guest {i}: {}",
            self.guest_log(i)
        );
        pid
    }

    /// A guest with a static address and a default route via the gateway.
    pub fn add_static_guest(&mut self, last_octet: u8) -> usize {
        let i = self.add_guest("wstap0", &format!("02:00:00:00:01:{last_octet:02x}"));
        let g = &self.guests[i];
        g.ip(&["addr", "add", &format!("192.168.2.{last_octet}/24"), "dev", "wstap0"]);
        g.ip(&["route", "add", "default", "via", "192.168.2.1"]);
        i
    }

    pub fn guest_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.logs.join(format!("g{i}.log"))).unwrap_or_default()
    }

    pub fn ping(&self, from: usize, to: &str) -> bool {
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
