//! Test support: network namespaces made by the test itself, a wsnic process running in one,
//! WebSocket guests (tungstenite, an independent implementation) and frame builders.
//!
//! Every namespace is created with `ip netns add` and deleted on drop; links, addresses and
//! rules are made inside it only; nothing touches the host's namespace.
#![allow(dead_code)]

pub mod frames;
pub mod lab;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by one test.
pub struct Netns {
    pub name: String,
    /// Background processes started with [`Netns::spawn`]; killed and reaped on drop.
    children: std::cell::RefCell<Vec<Child>>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("wsnt-{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name, children: Default::default() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.name).args(args);
        String::from_utf8_lossy(&run_ok(&mut c).stdout).into_owned()
    }

    /// A command to run inside the namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Start `prog args` inside, in the background, its output appended to `log`; returns its
    /// pid. The namespace's drop kills and reaps it.
    pub fn spawn(&self, prog: &str, args: &[&str], log: &std::path::Path) -> u32 {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = self
            .cmd(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.children.borrow_mut().push(child);
        pid
    }

    /// Run `prog args` inside; return its output whatever its status.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Output {
        self.cmd(prog).args(args).output().expect("spawn")
    }

    pub fn sysctl(&self, name: &str) -> String {
        let out = self.exec("cat", &[&format!("/proc/sys/{}", name.replace('.', "/"))]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn set_sysctl(&self, name: &str, value: &str) {
        run_ok(self.cmd("sh").args(["-c", &format!("echo {value} > /proc/sys/{}", name.replace('.', "/"))]));
    }

    pub fn link_exists(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Names of the links whose master is `bridge`.
    pub fn bridge_ports(&self, bridge: &str) -> Vec<String> {
        let out = Command::new("ip").args(["-n", &self.name, "-o", "link", "show", "master", bridge]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }

    /// Apply an nft script inside the namespace.
    pub fn nft(&self, script: &str) {
        let mut c = self.cmd("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn nft_tables(&self) -> String {
        String::from_utf8_lossy(&self.exec("nft", &["list", "tables"]).stdout).into_owned()
    }

    /// Run `f` on a thread that has entered this namespace; sockets it opens live here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter_netns(&name);
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// A TCP connection from inside the namespace.
    pub fn tcp(&self, addr: &str) -> TcpStream {
        let addr = addr.to_string();
        self.enter(move || TcpStream::connect(&addr).expect("connect"))
    }

    /// Make a veth pair: `here` in this namespace, `there` in `other`.
    pub fn veth(&self, here: &str, other: &Netns, there: &str) {
        self.ip(&["link", "add", here, "type", "veth", "peer", "name", there, "netns", &other.name]);
        self.ip(&["link", "set", here, "up"]);
        other.ip(&["link", "set", there, "up"]);
    }
}

impl Netns {
    /// A handle to an existing namespace that does not delete it on drop (for other threads).
    pub fn attach(name: &str) -> std::mem::ManuallyDrop<Netns> {
        std::mem::ManuallyDrop::new(Netns { name: name.to_string(), children: Default::default() })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then remove the namespace (its links go with it).
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        for mut c in self.children.borrow_mut().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("spawn");
    assert!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A wsnic server process in a namespace; its log goes to a file.
pub struct Wsnic {
    pub child: Child,
    pub log: PathBuf,
    /// Where this process's part of the log begins (a restart appends to the same file).
    log_start: usize,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_wsnic");

impl Wsnic {
    /// Start `wsnic ARGS` in `ns` and wait until it listens.
    pub fn start(ns: &Netns, args: &[&str]) -> Wsnic {
        let log = std::env::temp_dir().join(format!("{}.log", ns.name));
        let _ = std::fs::remove_file(&log);
        Self::start_logging(ns, args, log)
    }

    /// Start `wsnic -v ARGS` in `ns`, its log appended to `log`, and wait until it listens.
    pub fn start_logging(ns: &Netns, args: &[&str], log: PathBuf) -> Wsnic {
        Self::spawn(ns, args, log, true)
    }

    /// Like [`Wsnic::start_logging`]; `verbose`: with `-v` (debug lines).
    pub fn spawn(ns: &Netns, args: &[&str], log: PathBuf, verbose: bool) -> Wsnic {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let log_start = f.metadata().unwrap().len() as usize;
        let child = ns
            .cmd(BIN)
            .args(verbose.then_some("-v"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn wsnic");
        let mut w = Wsnic { child, log, log_start };
        w.wait_log("listening on", Duration::from_secs(10));
        w
    }

    /// This process's log lines.
    pub fn log_text(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(all.get(self.log_start..).unwrap_or_default()).into_owned()
    }

    /// Wait until the log contains `needle`; panic with the log if it does not in time.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("wsnic exited ({st}) before logging {needle:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {needle:?} in wsnic's log:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panic with the log if the server has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("wsnic exited ({st}):\n{}", self.log_text());
        }
    }

    pub fn signal(&self, sig: &str) {
        run_ok(Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]));
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal("TERM");
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "wsnic did not exit:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's pid: `ip netns exec` execs it, so it is the child's.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
    }
}

impl Drop for Wsnic {
    /// SIGTERM first, so that even a failed test leaves no state file behind; SIGKILL if
    /// it does not exit.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            // Generous: closing hundreds of TAPs takes the kernel a while.
            if !eventually(Duration::from_secs(30), || matches!(self.child.try_wait(), Ok(Some(_)))) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// Move the calling thread into network namespace `name` (`/var/run/netns/NAME`).
pub fn enter_netns(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns with a valid namespace fd affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Poll `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A WebSocket client standing in for a browser VM: a MAC, optionally an IPv4 address; it
/// answers ARP for its address and ICMP echo to it, as a guest kernel would.
pub struct Guest {
    pub ws: WebSocket<TcpStream>,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

impl Guest {
    pub fn connect(ns: &Netns, mac: [u8; 6], ip: Ipv4Addr) -> Guest {
        let stream = ns.tcp("127.0.0.1:8070");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (ws, resp) = tungstenite::client("ws://127.0.0.1:8070/", stream).expect("handshake");
        assert_eq!(resp.status(), 101);
        Guest { ws, mac, ip }
    }

    /// Like [`Guest::connect`], but None when the server is not there (any more).
    pub fn try_connect(ns: &Netns, mac: [u8; 6]) -> Option<Guest> {
        let addr = "127.0.0.1:8070".to_string();
        let stream = ns.enter(move || TcpStream::connect(&addr).ok())?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (ws, _) = tungstenite::client("ws://127.0.0.1:8070/", stream).ok()?;
        Some(Guest { ws, mac, ip: Ipv4Addr::UNSPECIFIED })
    }

    pub fn send(&mut self, frame: Vec<u8>) {
        self.ws.send(Message::binary(frame)).expect("send");
    }

    /// Read frames (answering ARP and ping on the way) until `want` matches one, or time out.
    pub fn recv_until(&mut self, timeout: Duration, mut want: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ws.get_mut().set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let f = b.to_vec();
                    if want(&f) {
                        return Some(f);
                    }
                    if let Some(reply) = frames::answer(&f, self.mac, self.ip) {
                        self.send(reply);
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None
                }
                // A read with a timeout fails with EINTR when the process is stopped and resumed
                // (or frozen and thawed) meanwhile, even without a signal handler: read again.
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("guest read: {e}"),
            }
        }
    }

    /// Read until the server's Close frame; its status code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("the connection was not closed with a Close frame: {e}"),
            }
        }
    }

    /// Resolve `ip` by ARP, asking again every second as a guest kernel does (a bridge whose
    /// first port just came up may still lack carrier for the first request); returns its MAC.
    pub fn arp(&mut self, ip: Ipv4Addr) -> [u8; 6] {
        for _ in 0..5 {
            self.send(frames::arp_request(self.mac, self.ip, ip));
            if let Some(f) = self.recv_until(Duration::from_secs(1), |f| frames::arp_reply_from(f, ip).is_some()) {
                return frames::arp_reply_from(&f, ip).unwrap();
            }
        }
        panic!("no ARP reply from {ip}");
    }
}

/// A WebSocket upgrade request for `/`, as a client writes it.
pub const UPGRADE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Read a response head from `s`, up to and with its blank line; an EOF before it fails the test.
pub fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF in handshake");
        head.push(b[0]);
    }
    head
}

/// A raw TCP connection that performs the handshake by hand (for cases a real client library
/// refuses to produce).
pub fn raw_ws(ns: &Netns) -> TcpStream {
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(UPGRADE_REQUEST).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// Read one server frame from a raw stream: (opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l)?;
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l)?;
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((h[0] & 0x0f, p))
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut v = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => v.push(0x80 | n as u8),
        n @ 126..=65535 => {
            v.push(0x80 | 126);
            v.extend((n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend((n as u64).to_be_bytes());
        }
    }
    v.extend(key);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    v
}

impl Guest {
    /// DISCOVER → OFFER → REQUEST → ACK; returns the bound address, or None if no OFFER came.
    pub fn dhcp(&mut self, xid: u32) -> Option<Ipv4Addr> {
        let u = Ipv4Addr::UNSPECIFIED;
        self.send(frames::dhcp_client(1, self.mac, xid, None, None, u));
        let offer =
            self.recv_until(Duration::from_secs(2), |f| frames::dhcp_reply(f, xid).is_some_and(|r| r.0 == 2))?;
        let (_, ip, server) = frames::dhcp_reply(&offer, xid).unwrap();
        self.send(frames::dhcp_client(3, self.mac, xid, Some(ip), server, u));
        let ack = self
            .recv_until(Duration::from_secs(5), |f| frames::dhcp_reply(f, xid).is_some_and(|r| r.0 == 5 || r.0 == 6))
            .expect("no ACK/NAK after REQUEST");
        let (kind, ip, _) = frames::dhcp_reply(&ack, xid).unwrap();
        assert_eq!(kind, 5, "NAK for an offered address");
        self.ip = ip;
        Some(ip)
    }
}

/// Open a WebSocket by hand with `path` and extra header lines (each ending in CRLF). Returns
/// the response's status code and the stream (open on 101, closed by the server otherwise).
pub fn handshake_with(ns: &Netns, path: &str, extra_headers: &str) -> (u16, TcpStream) {
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, s)
}

impl Guest {
    /// A guest over an already upgraded stream (see [`handshake_with`]).
    pub fn over(stream: TcpStream, mac: [u8; 6]) -> Guest {
        let ws = WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
        Guest { ws, mac, ip: Ipv4Addr::UNSPECIFIED }
    }
}

/// `iperf3 -c SERVER -t SECS [-R] -J` from `ns`; the received rate in Mbit/s.
pub fn iperf_mbit(ns: &Netns, server: &str, secs: u32, reverse: bool) -> f64 {
    let secs = secs.to_string();
    let mut args = vec!["-c", server, "-t", &secs, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = ns.exec("iperf3", &args);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iperf3 {args:?} failed: {json}");
    let recv = json.split("\"sum_received\"").nth(1).unwrap_or_else(|| panic!("{json}"));
    let bps: f64 =
        recv.split("\"bits_per_second\":").nth(1).unwrap().split([',', '}']).next().unwrap().trim().parse().unwrap();
    assert!(bps > 0.0);
    bps / 1e6
}
