//! What the benchmark reads from the kernel: CPU time of processes and threads
//! (`/proc/PID/stat`), a namespace's interface counters (`/proc/PID/net/dev`), memory
//! (`/proc/PID/status`), the machine's description; and the statistics (median, percentile).

use std::time::{Duration, Instant};

/// The CPUs thread `tid` may run on (0: the calling thread); `None` if it has exited.
pub fn affinity(tid: i32) -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) } != 0 {
        let e = std::io::Error::last_os_error();
        assert!(e.raw_os_error() == Some(libc::ESRCH), "sched_getaffinity({tid}): {e}");
        return None;
    }
    // SAFETY: CPU_ISSET reads the set within its size.
    Some((0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect())
}

/// Let thread `tid` run on `cpus` only; false if it has exited.
pub fn set_affinity(tid: i32, cpus: &[usize]) -> bool {
    // SAFETY: as in `affinity`; CPU_SET checks that the CPU is under CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
        let e = std::io::Error::last_os_error();
        assert!(e.raw_os_error() == Some(libc::ESRCH), "sched_setaffinity({tid}): {e}");
        return false;
    }
    true
}

/// The threads of process `pid`, as `/proc/PID/task` lists them now.
pub fn threads(pid: u32) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("threads of {pid}: {e}"));
    tasks.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Ticks per second of `utime`/`stime` in `/proc/*/stat`.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime in seconds from a `/proc/.../stat` file; None if it is gone.
pub fn cpu_secs(stat_path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck())
}

/// Something whose CPU time is sampled: a process (all its threads), one of our threads, or
/// the whole machine.
#[derive(Clone, Debug)]
pub struct CpuSource {
    pub name: String,
    what: Sampled,
}

#[derive(Clone, Debug)]
enum Sampled {
    /// A `/proc/…/stat` file; `whole`: a process, not a thread of one already counted.
    Stat { path: String, whole: bool },
    /// Busy time of every CPU (`/proc/stat`, without steal).
    Machine,
    /// Time the hypervisor gave our virtual CPUs to someone else.
    Steal,
}

pub const MACHINE: &str = "machine";
pub const STEAL: &str = "steal";

impl CpuSource {
    pub fn process(name: &str, pid: u32) -> CpuSource {
        CpuSource { name: name.to_string(), what: Sampled::Stat { path: format!("/proc/{pid}/stat"), whole: true } }
    }

    /// This benchmark process, all threads.
    pub fn this_process(name: &str) -> CpuSource {
        CpuSource { name: name.to_string(), what: Sampled::Stat { path: "/proc/self/stat".to_string(), whole: true } }
    }

    /// One thread of this process, by its kernel thread id.
    pub fn thread(name: &str, tid: i32) -> CpuSource {
        let path = format!("/proc/self/task/{tid}/stat");
        CpuSource { name: name.to_string(), what: Sampled::Stat { path, whole: false } }
    }

    /// The kernel's softirq threads (`ksoftirqd/N`): network work the kernel could not do in
    /// the context of the process that caused it.
    pub fn softirq_threads() -> Vec<CpuSource> {
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("ksoftirqd/") {
                v.push(CpuSource::process(comm.trim(), pid));
            }
        }
        v
    }

    /// The sources every window samples: this benchmark process, the machine, steal time.
    pub fn always() -> Vec<CpuSource> {
        vec![
            CpuSource::this_process("bench"),
            CpuSource { name: MACHINE.into(), what: Sampled::Machine },
            CpuSource { name: STEAL.into(), what: Sampled::Steal },
        ]
    }

    pub fn secs(&self) -> f64 {
        match &self.what {
            Sampled::Stat { path, .. } => cpu_secs(path).unwrap_or(f64::NAN),
            Sampled::Machine => machine_ticks().0 as f64 / clk_tck(),
            Sampled::Steal => machine_ticks().1 as f64 / clk_tck(),
        }
    }

    /// The stat file of a whole process (which counts toward "ours" when the rest of the
    /// machine's use is worked out); None for threads and the machine.
    fn whole_process_path(&self) -> Option<&str> {
        match &self.what {
            Sampled::Stat { path, whole: true } => Some(path),
            _ => None,
        }
    }
}

/// (busy ticks without steal, steal ticks) of all CPUs, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal …
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    (at(0) + at(1) + at(2) + at(5) + at(6), at(7))
}

/// CPU seconds of a set of sources between [`CpuWindow::start`] and [`CpuWindow::stop`].
pub struct CpuWindow {
    sources: Vec<CpuSource>,
    before: Vec<f64>,
    t0: Instant,
}

/// CPU use over one window: wall seconds and, per source, CPU seconds.
#[derive(Clone, Debug)]
pub struct CpuUse {
    pub wall: f64,
    pub secs: Vec<(String, f64)>,
    /// CPU seconds of the whole processes among the sources (not the machine, not threads).
    pub ours: f64,
}

impl CpuWindow {
    /// Sample `sources` and [`CpuSource::always`].
    pub fn start(sources: &[CpuSource]) -> CpuWindow {
        let sources: Vec<CpuSource> = sources.iter().cloned().chain(CpuSource::always()).collect();
        let before = sources.iter().map(CpuSource::secs).collect();
        CpuWindow { sources, before, t0: Instant::now() }
    }

    pub fn stop(self) -> CpuUse {
        let wall = self.t0.elapsed().as_secs_f64();
        let secs: Vec<(String, f64)> =
            self.sources.iter().zip(&self.before).map(|(s, b)| (s.name.clone(), s.secs() - b)).collect();
        let mut seen = std::collections::HashSet::new();
        let ours = self
            .sources
            .iter()
            .zip(&secs)
            .filter(|(s, _)| s.whole_process_path().is_some_and(|p| seen.insert(p)))
            .map(|(_, (_, t))| t)
            .sum();
        CpuUse { wall, secs, ours }
    }
}

impl CpuUse {
    /// CPU seconds of the source named `name` (summed over sources of that name).
    pub fn secs_of(&self, name: &str) -> f64 {
        self.secs.iter().filter(|(n, _)| n == name).map(|(_, s)| s).sum()
    }

    /// Add the CPU time of a child that ran within the window (from wait4's rusage).
    pub fn add_child(&mut self, name: &str, secs: f64) {
        self.secs.push((name.to_string(), secs));
        self.ours += secs;
    }

    /// Percent of one core used by processes other than ours (other users of the machine).
    pub fn others_pct(&self) -> f64 {
        100.0 * (self.secs_of(MACHINE) - self.ours).max(0.0) / self.wall
    }

    /// Percent of one core used by `name`.
    pub fn pct(&self, name: &str) -> f64 {
        100.0 * self.secs_of(name) / self.wall
    }
}

/// Per-window CPU percentages, summarised as medians per source name.
pub fn median_pct(uses: &[CpuUse], name: &str) -> f64 {
    median(&uses.iter().map(|u| u.pct(name)).collect::<Vec<_>>())
}

/// Interface counters of the namespace that process `pid` lives in: name → counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct DevCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

/// `/proc/PID/net/dev` of a process in the namespace, the interfaces whose names start with
/// `prefix` (a TAP prefix followed by a digit), summed.
pub fn dev_counters(pid: u32, prefix: &str) -> DevCounters {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/net/dev: {e} (did the relay exit?)"));
    let mut sum = DevCounters::default();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let name = name.trim();
        if !name.strip_prefix(prefix).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty()) {
            continue;
        }
        let v: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop …
        sum.rx_bytes += v[0];
        sum.rx_packets += v[1];
        sum.rx_dropped += v[3];
        sum.tx_bytes += v[8];
        sum.tx_packets += v[9];
        sum.tx_dropped += v[11];
    }
    sum
}

/// Names of interfaces starting with `prefix` + digits in process `pid`'s namespace.
pub fn dev_names(pid: u32, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| n.strip_prefix(prefix).is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit())))
        .collect()
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`, …).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile (`p` in 0..=100) of the finite values; NaN if there are none.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// nproc, CPU model, kernel, RAM and the load average when the benchmark started.
pub fn machine_description() -> String {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: {nproc} CPUs (nproc), {model}, Linux {}, {:.1} GiB RAM; load average at start {}",
        kernel.trim(),
        mem_kib as f64 / (1024.0 * 1024.0),
        load.join(" ")
    )
}

/// Where the relay's event-loop threads (named `w0`, `w1`, …) are, sampled every 5 ms from
/// `/proc/PID/task/*/{comm,stat,wchan}` while it runs: on a CPU, waiting for events (epoll), or
/// blocked in the kernel somewhere else — which shows a relay that is slow without using its
/// CPU. Helper threads (the signal-waiting main thread, the TAP reaper) are not counted.
pub struct WaitSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<std::collections::HashMap<String, u64>>>,
}

impl WaitSampler {
    pub fn start(pid: u32) -> WaitSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut counts = std::collections::HashMap::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    let comm = comm.trim();
                    let event_loop =
                        comm.len() > 1 && comm.starts_with('w') && comm[1..].bytes().all(|b| b.is_ascii_digit());
                    if !event_loop {
                        continue;
                    }
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?");
                    let w = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                    let w = w.trim();
                    // wchan "0": it woke between the two reads.
                    let place = if state == "R" || w.is_empty() || w == "0" {
                        "running"
                    } else if w.contains("poll") {
                        "epoll"
                    } else {
                        w
                    };
                    *counts.entry(place.to_string()).or_insert(0) += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            counts
        });
        WaitSampler { stop, handle: Some(handle) }
    }

    /// "blocked in X n% of samples" for the most frequent place other than running and
    /// epoll, if it is at least 5% of the samples.
    pub fn finish(mut self) -> Option<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = self.handle.take()?.join().ok()?;
        let total: u64 = counts.values().sum();
        let (place, n) = counts.iter().filter(|(p, _)| *p != "running" && *p != "epoll").max_by_key(|(_, n)| **n)?;
        let pct = 100.0 * *n as f64 / total.max(1) as f64;
        (pct >= 5.0).then(|| format!("event loop blocked in {place} {pct:.0}% of the time"))
    }
}

impl Drop for WaitSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
