//! The relay benchmark: `cargo bench --bench relay` (as root). It runs the release `wsnic` in
//! network namespaces of its own (deleted on exit, on panic and on Ctrl-C) and prints one
//! Markdown table:
//!
//! - (a) frames/s client→TAP and TAP→client, 64- and 1514-byte frames, 1/10/100 clients, with
//!   (f) relay CPU-seconds per million frames and per GB;
//! - (b) iperf3 TCP through a `wsnic connect` guest and NAT, both directions;
//! - (c) the round-trip time the relay adds (ping through the relay vs over a plain veth), as the
//!   scheduler places ping, `wsnic connect` and the relay, and with all three on one CPU;
//! - (d) connection setup: connections/s one at a time and 16 at once (also with 500 idle clients
//!   attached) and how many TAPs each case created (the rest reused spares), connect-to-first-frame;
//! - (e) relay memory per idle connection at 100 and 1000 clients.
//!
//! Every figure is the median of `WSNIC_BENCH_RUNS` (5) runs of `WSNIC_BENCH_SECS` (2) s, with
//! the CPU use of the relay and of each load process (a load process at ~100% means the figure
//! measures the load, not the relay). `WSNIC_BENCH_ONLY=a,c` runs some sections;
//! `WSNIC_BENCH_RELAY_ARGS` / `WSNIC_BENCH_CONNECT_ARGS` add arguments to the relay / to
//! `wsnic connect` (split on whitespace). `WSNIC_BENCH_UPLINK_NAPI=1` runs the uplink peer's
//! receive in a NAPI thread of its own instead of in the relay's system calls (section b).
//! `WSNIC_BENCH_CC=cubic` (or any algorithm in `net.ipv4.tcp_allowed_congestion_control`) sets
//! the TCP congestion control of every namespace the benchmark makes; otherwise they inherit the
//! machine's, which the title names. It matters: BBR paces each socket with a timer of its own
//! (veths default to `noqueue`, and the benchmark adds no `fq` qdisc), and on the benchmark
//! machine the relay's CPU per GB in section b was 1.25–2.4× (medians) what it is under cubic
//! (docs/performance.md).

#[path = "../tests/support/mod.rs"]
mod test_support;

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::loadgen::{self, bench_frame, client_mac, TapTarget, WsClient};
use support::measure::{self, median, percentile, CpuSource, CpuUse, CpuWindow, WaitSampler};
use support::table::{ms, print_table, si, Row};
use support::topo::{self, Settings, Topo};
use test_support::frames;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);
const TAP_PREFIX: &str = "wsnic";

fn main() {
    let settings = Settings::from_env();
    topo::clean_up_on_signal();
    if let Err(e) = wsnic::sys::raise_nofile_limit() {
        eprintln!("cannot raise the open-files limit: {e}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the relay benchmark needs root (network namespaces, TAP devices): sudo cargo bench --bench relay");
        std::process::exit(1);
    }
    let machine = measure::machine_description();
    eprintln!("{machine}");
    eprintln!("relay args: {}", settings.relay_argv().join(" "));
    eprintln!("{}", settings.cc_note());
    let started = Instant::now();
    let mut rows = Vec::new();
    let sections: [(char, Section); 5] =
        [('a', frames_per_second), ('b', iperf3), ('c', round_trip), ('d', connection_setup), ('e', memory)];
    for (name, run) in sections {
        if settings.wants(name) {
            eprintln!("({name}) …");
            run(&settings, &mut rows);
        }
    }
    let title = format!(
        "wsnic relay benchmark (`cargo bench --bench relay`): relay args `{}`; connect args `{}`; {}; {}; median of {} runs × {} s; {:.0} s in all",
        settings.relay_argv().join(" "),
        settings.connect_args.join(" "),
        settings.uplink_note(),
        settings.cc_note(),
        settings.runs,
        settings.secs,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("{machine}");
    println!();
    print_table(&title, &rows);
}

/// A section of the benchmark: runs its measurements and adds its rows.
type Section = fn(&Settings, &mut Vec<Row>);

fn secs(s: &Settings) -> Duration {
    Duration::from_secs_f64(s.secs)
}

/// Wait until the relay's namespace has exactly `n` TAPs (new clients up, old ones gone).
fn wait_for_taps(t: &mut Topo, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = measure::dev_names(t.relay_pid(), TAP_PREFIX).len();
        if have == n {
            return;
        }
        t.relay().assert_running();
        assert!(Instant::now() < deadline, "expected {n} TAPs in the relay's namespace, found {have}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// (a) + (f): frames per second

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    ClientToTap,
    TapToClient,
}

/// One (a) measurement window.
struct FrameRun {
    frames: u64,
    cpu: CpuUse,
    tx_dropped: u64,
    received: u64,
    /// Injector: frames the TAPs queued, frames refused by a full queue.
    accepted: u64,
    refused: u64,
}

fn frames_per_second(s: &Settings, rows: &mut Vec<Row>) {
    let mut t = Topo::new(s);
    let bridge = t.bridge_mac();
    let mut case = 0;
    for dir in [Direction::ClientToTap, Direction::TapToClient] {
        for len in [64usize, 1514] {
            for n in [1u32, 10, 100] {
                case += 1;
                if !s.wants_case(&frame_case_name(dir, len, n)) {
                    continue;
                }
                let (runs, blocked) = frame_case(&mut t, s, dir, len, n, bridge, case * 1000);
                rows.push(frame_row(dir, len, n, &runs).note(blocked));
                eprintln!("    {}", rows.last().map(|r| format!("{} {} {}", r.case, r.result, r.relay_cpu)).unwrap());
            }
        }
    }
}

fn frame_case(
    t: &mut Topo,
    s: &Settings,
    dir: Direction,
    len: usize,
    n: u32,
    bridge: [u8; 6],
    first_mac: u32,
) -> (Vec<FrameRun>, Option<String>) {
    let clients = loadgen::connect_clients(&t.ns(), first_mac, n, move |mac| bench_frame(bridge, mac, 64));
    wait_for_taps(t, n as usize);
    let relay_pid = t.relay_pid();
    let mut sources = vec![CpuSource::process("relay", relay_pid)];
    sources.extend(CpuSource::softirq_threads());
    let received = Arc::new(AtomicU64::new(0));
    let injected = Arc::new(loadgen::Injected::default());
    let workers = match dir {
        Direction::ClientToTap => {
            let w = loadgen::start_writer(clients, bridge, len);
            sources.push(CpuSource::thread("writer", w.tid));
            vec![w]
        }
        Direction::TapToClient => {
            let macs: Vec<[u8; 6]> = clients.iter().map(|c| c.mac).collect();
            let targets = tap_targets(t, &macs);
            let r = loadgen::start_reader(clients, received.clone());
            let i = loadgen::start_injector(&t.ns(), targets, len, injected.clone());
            sources.push(CpuSource::thread("reader", r.tid));
            sources.push(CpuSource::thread("injector", i.tid));
            vec![r, i]
        }
    };
    std::thread::sleep(Duration::from_millis(500)); // warm-up
    let sampler = WaitSampler::start(relay_pid);
    let mut runs = Vec::new();
    let counts = || {
        let c = measure::dev_counters(relay_pid, TAP_PREFIX);
        (c, received.load(SEQ), injected.accepted.load(SEQ), injected.refused.load(SEQ))
    };
    for _ in 0..s.runs {
        let (c0, r0, a0, f0) = counts();
        let w = CpuWindow::start(&sources);
        std::thread::sleep(secs(s));
        let cpu = w.stop();
        let (c1, r1, a1, f1) = counts();
        t.relay().assert_running();
        let frames = match dir {
            Direction::ClientToTap => c1.rx_packets - c0.rx_packets,
            Direction::TapToClient => c1.tx_packets - c0.tx_packets,
        };
        runs.push(FrameRun {
            frames,
            cpu,
            tx_dropped: c1.tx_dropped - c0.tx_dropped,
            received: r1 - r0,
            accepted: a1 - a0,
            refused: f1 - f0,
        });
    }
    let blocked = sampler.finish();
    drop(workers); // closes the clients
    wait_for_taps(t, 0);
    (runs, blocked)
}

const SEQ: Ordering = Ordering::SeqCst;

/// Each client's TAP (learned by the bridge from the client's first frame) as an injector target.
fn tap_targets(t: &Topo, macs: &[[u8; 6]]) -> Vec<TapTarget> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fdb = t.tap_of_macs();
        let found: Vec<Option<&String>> =
            macs.iter().map(|m| fdb.iter().find(|(fm, _)| fm == m).map(|(_, dev)| dev)).collect();
        if found.iter().all(Option::is_some) {
            return macs
                .iter()
                .zip(found)
                .map(|(mac, dev)| TapTarget { ifindex: loadgen::ifindex_in(&t.ns(), dev.unwrap()), mac: *mac })
                .collect();
        }
        assert!(Instant::now() < deadline, "the bridge did not learn every client's MAC: {fdb:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn frame_case_name(dir: Direction, len: usize, n: u32) -> String {
    let name = match dir {
        Direction::ClientToTap => "client→TAP",
        Direction::TapToClient => "TAP→client",
    };
    let clients = if n == 1 { "1 client".to_string() } else { format!("{n} clients") };
    format!("{name} {len} B, {clients}")
}

fn frame_row(dir: Direction, len: usize, n: u32, runs: &[FrameRun]) -> Row {
    let per_sec = |f: &dyn Fn(&FrameRun) -> f64| median(&runs.iter().map(|r| f(r) / r.cpu.wall).collect::<Vec<_>>());
    let fps = per_sec(&|r| r.frames as f64);
    let relay_s = |r: &FrameRun| r.cpu.secs_of("relay");
    let per_mframe = median(&runs.iter().map(|r| relay_s(r) / (r.frames as f64 / 1e6)).collect::<Vec<_>>());
    let per_gb = median(&runs.iter().map(|r| relay_s(r) / (r.frames as f64 * len as f64 / 1e9)).collect::<Vec<_>>());
    let mut row = Row::new("a", frame_case_name(dir, len, n));
    row.result = format!("{}frames/s, {:.0} Mbit/s", si(fps), fps * len as f64 * 8.0 / 1e6);
    row.cost = format!("{per_mframe:.2} /Mframe, {per_gb:.2} /GB");
    let uses: Vec<CpuUse> = runs.iter().map(|r| r.cpu.clone()).collect();
    let soft: Vec<String> =
        runs[0].cpu.secs.iter().map(|(n, _)| n.clone()).filter(|n| n.starts_with("ksoftirqd")).collect();
    let mut load: Vec<(&str, &str)> = match dir {
        Direction::ClientToTap => vec![("writer", "writer")],
        Direction::TapToClient => vec![("injector", "injector"), ("reader", "ws reader")],
    };
    load.extend(soft.iter().map(|s| (s.as_str(), s.as_str())));
    row = row.cpu(&uses, "relay", &load);
    if fps < 1.0 {
        row.notes = "no frames passed: see the relay log".into();
    }
    if dir == Direction::TapToClient {
        let got = median(&runs.iter().map(|r| 100.0 * r.received as f64 / r.frames.max(1) as f64).collect::<Vec<_>>());
        row.notes = format!(
            "clients got {got:.1}% of tx_packets; injector: {}/s queued, {}/s refused by a full TAP queue; tx_dropped {}/s",
            si(per_sec(&|r| r.accepted as f64)),
            si(per_sec(&|r| r.refused as f64)),
            si(per_sec(&|r| r.tx_dropped as f64))
        );
    }
    row
}

// ---------------------------------------------------------------------------------------------
// (b) iperf3 through a `wsnic connect` guest

const UPLINK_PEER: &str = "198.51.100.1";

fn iperf3(s: &Settings, rows: &mut Vec<Row>) {
    let mut t = Topo::new(s);
    let g = t.add_static_guest(10);
    let server_pid = t.lab.upl.spawn("iperf3", &["-s", "-B", UPLINK_PEER], &t.lab.logs.join("iperf3-server.log"));
    assert!(t.lab.ping(g, UPLINK_PEER), "guest cannot reach the uplink peer through the relay: {}", t.lab.guest_log(g));
    let sources = [
        CpuSource::process("relay", t.relay_pid()),
        CpuSource::process("connect", t.lab.connect_pids[g]),
        CpuSource::process("iperf3 -s", server_pid),
    ];
    for (reverse, name) in [(false, "guest→uplink (through NAT)"), (true, "uplink→guest (-R)")] {
        let sampler = WaitSampler::start(t.relay_pid());
        let r: Vec<(f64, f64, CpuUse)> = (0..s.runs).map(|_| iperf3_run(&t, g, s, reverse, &sources)).collect();
        let blocked = sampler.finish();
        let mbit = median(&r.iter().map(|x| x.0).collect::<Vec<_>>());
        let per_gb = median(&r.iter().map(|x| x.2.secs_of("relay") / (x.1 / 1e9)).collect::<Vec<_>>());
        // Everything the machine's CPUs did (relay, guest, iperf3, kernel threads), per GB: work
        // moved off the relay shows here.
        let machine_gb = median(&r.iter().map(|x| x.2.secs_of(measure::MACHINE) / (x.1 / 1e9)).collect::<Vec<_>>());
        let mut row = Row::new("b", format!("iperf3 TCP {name}"));
        row.result = format!("{mbit:.0} Mbit/s");
        row.cost = format!("{per_gb:.2} /GB");
        row.notes = format!("whole machine {machine_gb:.2} CPU-s/GB");
        let uses: Vec<CpuUse> = r.iter().map(|x| x.2.clone()).collect();
        row =
            row.cpu(&uses, "relay", &[("connect", "connect"), ("iperf3 -c", "iperf3 -c"), ("iperf3 -s", "iperf3 -s")]);
        rows.push(row.note(blocked));
    }
}

/// One `iperf3 -c … -J` from guest `g`: (Mbit/s received, bytes received, CPU use), the
/// client's own CPU time from wait4's rusage.
fn iperf3_run(t: &Topo, g: usize, s: &Settings, reverse: bool, sources: &[CpuSource]) -> (f64, f64, CpuUse) {
    let secs = (s.secs.ceil() as u64).max(1).to_string();
    let mut cmd = t.lab.guests[g].cmd("iperf3");
    cmd.args(["-c", UPLINK_PEER, "-t", &secs, "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let w = CpuWindow::start(sources);
    let (status, json, usage) = run_measured(&mut cmd);
    let mut cpu = w.stop();
    cpu.add_child("iperf3 -c", usage);
    assert!(status == 0, "iperf3 {} failed: {json}", if reverse { "-R" } else { "" });
    let field = |name: &str| -> f64 {
        let sum = json.split("\"sum_received\"").nth(1).unwrap_or_else(|| panic!("no sum_received: {json}"));
        let v = sum.split(&format!("\"{name}\":")).nth(1).unwrap_or_else(|| panic!("no {name}: {json}"));
        v.split([',', '}']).next().unwrap().trim().parse().unwrap()
    };
    (field("bits_per_second") / 1e6, field("bytes"), cpu)
}

/// Run `cmd` to its end: (exit status, standard output, its user + system CPU seconds).
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its CPU time
fn run_measured(cmd: &mut std::process::Command) -> (i32, String, f64) {
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let (status, cpu) = wait4(child.id());
    (status, out, cpu)
}

/// Reap child `pid`: (exit status, its user + system CPU seconds).
fn wait4(pid: u32) -> (i32, f64) {
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and ru are valid.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, pid as i32, "wait4: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (libc::WEXITSTATUS(status), tv(ru.ru_utime) + tv(ru.ru_stime))
}

// ---------------------------------------------------------------------------------------------
// (c) round-trip time

fn round_trip(s: &Settings, rows: &mut Vec<Row>) {
    let mut t = Topo::new(s);
    let g = t.add_static_guest(10);
    assert!(t.lab.ping(g, "192.168.2.1"), "guest cannot ping the gateway: {}", t.lab.guest_log(g));
    round_trip_rows(&t, g, s, None, rows);
    // The same with ping, `wsnic connect` and the relay on one CPU: every wake-up on the path is
    // then a switch on a running CPU, not an interrupt to another (on a VM, a wake-up from idle
    // is tens of µs). This separates what the path costs from where the scheduler puts it.
    let allowed = measure::affinity(0).expect("this thread exists");
    if allowed.len() > 1 {
        let cpu = allowed[allowed.len() - 1];
        let saved: Vec<(i32, Vec<usize>)> = [t.relay_pid(), t.lab.connect_pids[g]]
            .into_iter()
            .flat_map(measure::threads)
            .filter_map(|tid| Some((tid, measure::affinity(tid)?)))
            .collect();
        for (tid, _) in &saved {
            measure::set_affinity(*tid, &[cpu]);
        }
        round_trip_rows(&t, g, s, Some(cpu), rows);
        for (tid, cpus) in &saved {
            measure::set_affinity(*tid, cpus);
        }
    }
}

/// Section c's two rows: ping through the relay and over a plain veth, with ping on CPU `pin`
/// if given (the caller pins the relay and `wsnic connect`).
fn round_trip_rows(t: &Topo, g: usize, s: &Settings, pin: Option<usize>, rows: &mut Vec<Row>) {
    let sources = [CpuSource::process("relay", t.relay_pid()), CpuSource::process("connect", t.lab.connect_pids[g])];
    // Guest 0's control link: the relay's end is 203.0.113.1 (tests/support/lab.rs).
    let paths = [
        ("via the relay: guest → gateway 192.168.2.1", "192.168.2.1"),
        ("plain veth: guest → relay ns 203.0.113.1", "203.0.113.1"),
    ];
    let mut stats: [Vec<(f64, f64, CpuUse)>; 2] = [Vec::new(), Vec::new()];
    let sampler = WaitSampler::start(t.relay_pid());
    for _ in 0..s.runs {
        for (k, (_, addr)) in paths.iter().enumerate() {
            let w = CpuWindow::start(&sources);
            let mut cmd = match pin {
                Some(cpu) => {
                    let mut c = t.lab.guests[g].cmd("taskset");
                    c.args(["-c", &cpu.to_string(), "ping"]);
                    c
                }
                None => t.lab.guests[g].cmd("ping"),
            };
            let (_, text, ping_cpu) = run_measured(cmd.args(["-c", "500", "-i", "0.002", "-s", "56", "-W", "2", addr]));
            let mut cpu = w.stop();
            cpu.add_child("ping", ping_cpu);
            let times: Vec<f64> = text
                .split("time=")
                .skip(1)
                .filter_map(|r| r.split_whitespace().next().and_then(|v| v.parse().ok()))
                .collect();
            assert!(times.len() >= 450, "ping {addr}: {} replies of 500:\n{text}", times.len());
            stats[k].push((percentile(&times, 50.0), percentile(&times, 99.0), cpu));
        }
    }
    let mut blocked = sampler.finish();
    let p50s: Vec<f64> = stats.iter().map(|v| median(&v.iter().map(|x| x.0).collect::<Vec<_>>())).collect();
    let place = pin.map(|c| format!(", all on CPU {c}")).unwrap_or_default();
    for (k, (name, _)) in paths.iter().enumerate() {
        let p99 = median(&stats[k].iter().map(|x| x.1).collect::<Vec<_>>());
        let mut row = Row::new("c", format!("ping -i 0.002 ×500, {name}{place}"));
        row.result = format!("p50 {}, p99 {}", ms(p50s[k]), ms(p99));
        let uses: Vec<CpuUse> = stats[k].iter().map(|x| x.2.clone()).collect();
        row = row.cpu(&uses, "relay", &[("connect", "connect"), ("ping", "ping")]);
        if k == 0 {
            row.notes = format!("the relay adds {} (difference of the p50s)", ms(p50s[0] - p50s[1]));
            if let Some(c) = pin {
                row.notes += &format!("; ping, wsnic connect and the relay pinned to CPU {c}");
            }
            row = row.note(blocked.take());
        }
        rows.push(row);
    }
}

// ---------------------------------------------------------------------------------------------
// (d) connection setup

fn connection_setup(s: &Settings, rows: &mut Vec<Row>) {
    let mut t = Topo::new(s);
    let ns = t.ns();
    // Many short connections from one address: a wide port range, TIME_WAIT reuse (in the
    // relay's namespace only).
    t.lab.relay.set_sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    t.lab.relay.set_sysctl("net.ipv4.tcp_tw_reuse", "1");
    // One client stays connected throughout, so the bridge keeps its carrier and the first
    // frames of each new client are not lost to a bridge coming up.
    let bridge = t.bridge_mac();
    let anchor = loadgen::connect_clients(&ns, 0xff_0000, 1, move |mac| bench_frame(bridge, mac, 64));
    wait_for_taps(&mut t, 1);
    for threads in [1usize, 16] {
        rows.push(connect_rate(&mut t, s, threads, 1));
    }
    rows.push(first_frame_latency(&mut t, s));
    // The same with many clients attached: what a port coming up or going down costs the
    // kernel may grow with the number of ports on the bridge.
    let idle =
        loadgen::connect_clients(&ns, 0xfe_0000, IDLE_ATTACHED as u32 - 1, move |mac| bench_frame(bridge, mac, 64));
    wait_for_taps(&mut t, IDLE_ATTACHED);
    rows.push(connect_rate(&mut t, s, 16, IDLE_ATTACHED));
    drop(idle);
    drop(anchor);
}

/// MACs for connection-setup clients: never reused within a run.
static NEXT_MAC: AtomicU64 = AtomicU64::new(0x0100_0000);

fn fresh_mac() -> [u8; 6] {
    client_mac(NEXT_MAC.fetch_add(1, SEQ) as u32)
}

/// Clients kept connected (idle) during the last connection-rate case of (d).
const IDLE_ATTACHED: usize = 500;

/// `threads` threads connect, handshake and close in a loop while `attached` clients stay
/// connected; connections per second.
fn connect_rate(t: &mut Topo, s: &Settings, threads: usize, attached: usize) -> Row {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let ns = t.ns();
    let before = t.probe_ifindex();
    let workers: Vec<loadgen::Worker> = (0..threads)
        .map(|_| {
            let (done, failed, first_error, ns) = (done.clone(), failed.clone(), first_error.clone(), ns.clone());
            loadgen::Worker::spawn(move |stop| {
                loadgen::enter_netns(&ns);
                while !stop.load(Ordering::Relaxed) {
                    match WsClient::connect("127.0.0.1:8070", fresh_mac()).and_then(WsClient::close) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    let sources = [CpuSource::process("relay", t.relay_pid()), CpuSource::this_process("clients")];
    std::thread::sleep(Duration::from_millis(500));
    let sampler = WaitSampler::start(t.relay_pid());
    let mut runs = Vec::new();
    for _ in 0..s.runs {
        let (d0, f0) = (done.load(SEQ), failed.load(SEQ));
        let w = CpuWindow::start(&sources);
        std::thread::sleep(secs(s));
        let cpu = w.stop();
        runs.push((done.load(SEQ) - d0, failed.load(SEQ) - f0, cpu));
        t.relay().assert_running();
    }
    let blocked = sampler.finish();
    drop(workers);
    wait_for_taps(t, attached);
    // Every connection of the case (also outside the measured windows): the rest took a spare.
    let created = u64::from(t.probe_ifindex().0 - before.1 - 1);
    let connections = done.load(SEQ) + failed.load(SEQ);
    let rate = median(&runs.iter().map(|r| r.0 as f64 / r.2.wall).collect::<Vec<_>>());
    let per_conn = median(&runs.iter().map(|r| r.2.secs_of("relay") / r.0.max(1) as f64).collect::<Vec<_>>());
    let uses: Vec<CpuUse> = runs.iter().map(|r| r.2.clone()).collect();
    let mut what = if threads == 1 { "1 at a time".to_string() } else { format!("{threads} at once") };
    if attached > 1 {
        what += &format!(", {attached} idle clients attached");
    }
    let mut row = Row::new("d", format!("connect + handshake + close, {what}"));
    row.result = format!("{:.0} conn/s", rate);
    row.cost = format!("{:.3} ms /conn", per_conn * 1e3);
    row = row.cpu(&uses, "relay", &[("clients", "bench (clients)")]);
    row.notes = format!("{created} TAPs created for {connections} connections");
    let fails: u64 = runs.iter().map(|r| r.1).sum();
    if fails > 0 {
        row.notes += &format!("; {fails} failed, first: {}", first_error.lock().unwrap().clone().unwrap_or_default());
    }
    row.note(blocked)
}

/// Connect, handshake, ARP request for the gateway, until the ARP reply arrives; then close.
fn first_frame_latency(t: &mut Topo, s: &Settings) -> Row {
    let ns = t.ns();
    let sources = [CpuSource::process("relay", t.relay_pid()), CpuSource::this_process("client")];
    let sampler = WaitSampler::start(t.relay_pid());
    let mut runs = Vec::new();
    for _ in 0..s.runs {
        let w = CpuWindow::start(&sources);
        let (ns, window) = (ns.clone(), secs(s));
        let samples = std::thread::spawn(move || {
            loadgen::enter_netns(&ns);
            let spa = Ipv4Addr::new(192, 168, 2, 200);
            let end = Instant::now() + window;
            let mut v = Vec::new();
            while Instant::now() < end {
                let mac = fresh_mac();
                let t0 = Instant::now();
                let mut c = WsClient::connect("127.0.0.1:8070", mac).unwrap_or_else(|e| panic!("connect: {e}"));
                c.send(&frames::arp_request(mac, spa, GATEWAY)).unwrap();
                loop {
                    let (op, p) = c.read_frame().unwrap_or_else(|e| panic!("no ARP reply from the gateway: {e}"));
                    if op == 2 && frames::arp_reply_from(&p, GATEWAY).is_some() {
                        break;
                    }
                }
                v.push(t0.elapsed().as_secs_f64() * 1e3);
                c.close().unwrap();
            }
            v
        })
        .join()
        .expect("latency thread");
        let cpu = w.stop();
        runs.push((percentile(&samples, 50.0), percentile(&samples, 99.0), samples.len(), cpu));
    }
    wait_for_taps(t, 1);
    let mut row = Row::new("d", "TCP connect → first frame (ARP reply from the gateway), 1 at a time");
    row.result = format!(
        "p50 {}, p99 {}",
        ms(median(&runs.iter().map(|r| r.0).collect::<Vec<_>>())),
        ms(median(&runs.iter().map(|r| r.1).collect::<Vec<_>>()))
    );
    let uses: Vec<CpuUse> = runs.iter().map(|r| r.3.clone()).collect();
    row = row.cpu(&uses, "relay", &[("client", "bench (client)")]);
    row.notes = format!("{} samples per run, then close", median(&runs.iter().map(|r| r.2 as f64).collect::<Vec<_>>()));
    row.note(sampler.finish())
}

// ---------------------------------------------------------------------------------------------
// (e) memory per idle connection

fn memory(s: &Settings, rows: &mut Vec<Row>) {
    let mut t = Topo::new(s);
    let bridge = t.bridge_mac();
    let counts = [100u32, 1000];
    // Per run: (VmRSS, RssAnon) in KiB at 0 and at each count.
    let mut runs: Vec<Vec<(u64, u64)>> = Vec::new();
    for run in 0..s.runs {
        t.restart_relay();
        let pid = t.relay_pid();
        std::thread::sleep(Duration::from_millis(300));
        let rss = || (measure::status_kib(pid, "VmRSS"), measure::status_kib(pid, "RssAnon"));
        let mut v = vec![rss()];
        let mut clients: Vec<WsClient> = Vec::new();
        for &n in &counts {
            let more = n - clients.len() as u32;
            let first = 0x0200_0000 + run as u32 * 4096 + clients.len() as u32;
            clients.extend(loadgen::connect_clients(&t.ns(), first, more, move |mac| bench_frame(bridge, mac, 64)));
            wait_for_taps(&mut t, n as usize);
            std::thread::sleep(Duration::from_secs(1)); // idle: buffers back in the pool
            v.push(rss());
        }
        runs.push(v);
        drop(clients);
    }
    for (k, &n) in counts.iter().enumerate() {
        let per = |f: fn(&(u64, u64)) -> u64| {
            median(
                &runs.iter().map(|v| (f(&v[k + 1]) as f64 - f(&v[0]) as f64) * 1024.0 / n as f64).collect::<Vec<_>>(),
            )
        };
        let (rss, anon) = (per(|x| x.0), per(|x| x.1));
        let mut row = Row::new("e", format!("relay memory per idle connection, {n} clients"));
        row.result = format!("{:.1} KiB VmRSS ({:.1} KiB RssAnon)", rss / 1024.0, anon / 1024.0);
        let mib = |f: fn(&(u64, u64)) -> u64, i: usize| {
            median(&runs.iter().map(|v| f(&v[i]) as f64 / 1024.0).collect::<Vec<_>>())
        };
        row.notes = format!("VmRSS {:.1} MiB with 0 clients, {:.1} MiB with {n}", mib(|x| x.0, 0), mib(|x| x.0, k + 1));
        row.relay_cpu = "—".into();
        rows.push(row);
    }
}
