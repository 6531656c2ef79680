//! Takes finished clients' TAP devices off the event loop's thread: keeps a few briefly as
//! spares for the next clients, and deletes the rest in batches. Also gives a busy client's
//! TAP its kernel thread ([`Reaper::threaded`]): that takes the RTNL lock, which the reaper
//! itself holds most often, once by spinning, so it is done here rather than on the event loop.
//! A TAP with a thread is never kept as a spare: the next client may be an interactive one,
//! better served without it.
//!
//! Closing a TAP's file descriptor unregisters its network device, and the kernel waits for
//! an RCU grace period before it returns: 16–20 ms per device on a small VM
//! (`benches/tap_cost.py`). Creating one and attaching it to the bridge costs about 0.3 ms
//! more. On the event loop that would stall every other client for each disconnect and cap the
//! connection rate near 55/s. Instead the loop hands a finished client's TAP (already out of
//! its poll set) to the reaper thread, which either keeps it as a spare or deletes it. A spare
//! stays a port of the bridge, up, but its port is disabled (nothing more is forwarded to it)
//! and the MACs learned on it are flushed, in one request; then what was still queued is read
//! and dropped. Not setting it down spares the kernel's `NETDEV_DOWN` work, NAT masquerade's
//! walk of the whole conntrack table among it, and an RCU grace period. Deletion is batched: each TAP
//! is put in a device group of its own, the whole group goes with one `RTM_DELLINK` (one grace
//! period for the batch), and only then are the descriptors closed, which is now cheap.
//!
//! A new client takes a spare if there is one (the loop only enables its port again), so a burst of
//! reconnections costs neither creation nor deletion. Spares are bounded ([`Reaper::start`]'s
//! `keep`) and short-lived (`ttl`): a quiet server keeps none. A TAP whose port cannot be
//! disabled (a bridge running STP refuses), one handed over with [`Reaper::discard`], and any
//! TAP while the bridge snoops multicast, is deleted, never kept.
//!
//! Every TAP handed over is counted until it is a spare or deleted ([`Reaper::backlog`]): each is
//! still a bridge port and not yet a spare, so the event loop stops accepting while too many wait
//! (its `MAX_REAPING`).
//!
//! The group number is derived from the bridge's ifindex, so two wsnic instances in one
//! namespace never delete each other's devices. Dropping the reaper deletes the spares and
//! what is queued, and joins the thread, so every TAP is gone before the caller removes the
//! bridge.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys::netlink::Netlink;
use crate::sys::tap::{Tap, TapHandle};

/// Most TAPs deleted in one batch.
const BATCH: usize = 1024;

/// What the event loop hands the reaper's thread, in order: a TAP's thread request always
/// comes before that TAP is reaped, so it never names a device already deleted.
enum Job {
    /// A finished client's TAP: kept as a spare if there is room, else deleted.
    Reap(Tap),
    /// A TAP that is not to serve a client again: deleted.
    Discard(Tap),
    Thread(TapHandle),
}

pub struct Reaper {
    tx: Option<mpsc::Sender<Job>>,
    /// False once a thread request has shown that this host cannot give TAPs threads.
    threads_available: Arc<AtomicBool>,
    /// TAPs handed over by [`Reaper::reap`] or [`Reaper::discard`] and not yet kept as spares
    /// or deleted.
    backlog: Arc<AtomicUsize>,
    spares: Arc<Mutex<Vec<(Tap, Instant)>>>,
    /// At most this many spares ([`Reaper::set_keep`]).
    keep: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The device group of the TAPs on their way out, for the bridge with ifindex `bridge`.
pub fn group_for(bridge: u32) -> u32 {
    0x8000_0000 | bridge
}

impl Reaper {
    /// Start the thread: it keeps up to `keep` spare TAPs for `ttl` each and deletes the rest
    /// through device group `group_for(bridge)`.
    pub fn start(bridge: u32, keep: usize, ttl: Duration) -> io::Result<Reaper> {
        let mut nl = Netlink::open()?;
        let group = group_for(bridge);
        let (tx, rx) = mpsc::channel::<Job>();
        let spares: Arc<Mutex<Vec<(Tap, Instant)>>> = Arc::default();
        let kept = Arc::clone(&spares);
        let threads_available = Arc::new(AtomicBool::new(true));
        let mut threads = Threads { available: Arc::clone(&threads_available) };
        let backlog = Arc::new(AtomicUsize::new(0));
        let handed = Arc::clone(&backlog);
        let keep = Arc::new(AtomicUsize::new(keep));
        let limit = Arc::clone(&keep);
        let thread = std::thread::Builder::new().name("wsnic-reaper".into()).spawn(move || {
            // Each TAP taken with whether it may be kept.
            let mut batch: Vec<(Tap, bool)> = Vec::with_capacity(BATCH);
            let mut doomed = Vec::new();
            let mut unkept = Unkept::default();
            let mut snoop = Snooping::default();
            loop {
                let wait = if kept.lock().expect("spares").is_empty() { Duration::from_secs(3600) } else { ttl / 2 };
                let open = match rx.recv_timeout(wait) {
                    Ok(job) => {
                        threads.take(job, &mut batch);
                        while batch.len() < BATCH {
                            match rx.try_recv() {
                                Ok(job) => threads.take(job, &mut batch),
                                Err(_) => break,
                            }
                        }
                        true
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => true,
                    Err(mpsc::RecvTimeoutError::Disconnected) => false,
                };
                let now = Instant::now();
                let taken = batch.len();
                for (t, may_keep) in batch.drain(..) {
                    // Only this thread adds spares, so there is still room when it pushes. The
                    // bridge is asked about snooping last: only for a TAP that could be kept.
                    let room = kept.lock().expect("spares").len() < limit.load(Ordering::Relaxed);
                    if !open || !room || !may_keep || t.is_threaded() || snoop.on(&mut nl, bridge, now) {
                        doomed.push(t);
                        continue;
                    }
                    if let Err(e) = nl.set_port_forwarding(t.index(), false) {
                        unkept.say(&t, &e);
                        doomed.push(t);
                        continue;
                    }
                    drain(&t);
                    kept.lock().expect("spares").push((t, now));
                }
                {
                    let mut s = kept.lock().expect("spares");
                    let mut i = 0;
                    while i < s.len() {
                        if !open || now.saturating_duration_since(s[i].1) >= ttl {
                            doomed.push(s.swap_remove(i).0);
                        } else {
                            i += 1;
                        }
                    }
                }
                delete(&mut nl, group, &mut doomed);
                // Every TAP taken this round is now a spare or gone.
                handed.fetch_sub(taken, Ordering::Relaxed);
                if !open {
                    break;
                }
            }
        })?;
        Ok(Reaper { tx: Some(tx), threads_available, backlog, spares, keep, thread: Some(thread) })
    }

    /// Keep at most `keep` spares from now on (those above it go within `ttl`).
    pub fn set_keep(&self, keep: usize) {
        self.keep.store(keep, Ordering::Relaxed);
    }

    /// Queue `tap` (out of every poll set) to be kept as a spare or removed; never blocks.
    /// The caller bounds how many wait ([`Reaper::backlog`]).
    pub fn reap(&self, tap: Tap) {
        self.hand(Job::Reap(tap));
    }

    /// Queue `tap` to be removed, never kept: a spare whose port would not forward again, or a
    /// new TAP whose setup failed half-way (it may be a port, down). Never blocks; counted in
    /// [`Reaper::backlog`] like the others.
    pub fn discard(&self, tap: Tap) {
        self.hand(Job::Discard(tap));
    }

    fn hand(&self, job: Job) {
        if let Some(tx) = &self.tx {
            self.backlog.fetch_add(1, Ordering::Relaxed);
            // The thread only stops when `tx` is dropped; if it died, the TAP closes here.
            if tx.send(job).is_err() {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// TAPs handed to [`Reaper::reap`] or [`Reaper::discard`] that are not yet spares or
    /// deleted. Each is still a port of the bridge, which holds at most 1023. Zero once the
    /// thread has died (nothing in it is expected to panic): what it held closed with its
    /// channel, and each TAP handed over then closes on the caller's thread, so nobody waits
    /// for it.
    pub fn backlog(&self) -> usize {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return 0;
        }
        self.backlog.load(Ordering::Relaxed)
    }

    /// Ask for `tap`'s NAPI context to run in a kernel thread of its own (see `sys::tap`), and
    /// note it on `tap`; never blocks.
    pub fn threaded(&self, tap: &mut Tap) {
        tap.mark_threaded();
        match (&self.tx, tap.handle()) {
            (Some(tx), Ok(h)) => {
                let _ = tx.send(Job::Thread(h));
            }
            (_, Err(e)) => log::debug!("{}: no second descriptor for its thread: {e}", tap.name()),
            (None, _) => {}
        }
    }

    /// Can TAPs get kernel threads here? True until a request has shown otherwise; new TAPs
    /// are then opened without a NAPI context, which would only cost them time.
    pub fn threads_available(&self) -> bool {
        self.threads_available.load(Ordering::Relaxed)
    }

    /// A spare TAP: a port of the bridge, not forwarding, nothing queued. The newest first (it
    /// has the longest left to live). Drained once more here: a frame the bridge was already
    /// forwarding to it when its port stopped (on another core) may have landed after the
    /// reaper's drain. Nothing waits for such frames as a link going down did (an RCU grace
    /// period): a spare handed out within microseconds of its port stopping could still get one
    /// afterwards (docs/design.md).
    pub fn spare(&self) -> Option<Tap> {
        let t = self.spares.lock().expect("spares").pop().map(|(t, _)| t)?;
        drain(&t);
        Some(t)
    }
}

/// The thread requests: carried out at once, until one shows that this host cannot do it.
struct Threads {
    available: Arc<AtomicBool>,
}

impl Threads {
    /// Do `job` if it is a thread request; queue it on `batch` if it is a TAP to reap (with
    /// whether it may be kept).
    fn take(&mut self, job: Job, batch: &mut Vec<(Tap, bool)>) {
        let h = match job {
            Job::Reap(t) => return batch.push((t, true)),
            Job::Discard(t) => return batch.push((t, false)),
            Job::Thread(_) if !self.available.load(Ordering::Relaxed) => return,
            Job::Thread(h) => h,
        };
        match h.give_thread(Path::new(SYS_CLASS_NET)) {
            Ok(()) => log::debug!("{}: NAPI in a kernel thread of its own", h.name()),
            // No sysfs of this namespace (or another namespace's), a read-only one, or a
            // kernel without threaded NAPI (before 5.12) or IFF_NAPI (before 4.15): for good.
            // The kernel's work then stays in the event loop's write(), as before.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EACCES | libc::EPERM | libc::EROFS)
                    ) =>
            {
                log::info!("busy clients' TAPs get no kernel thread of their own ({}: {e})", h.name());
                self.available.store(false, Ordering::Relaxed);
            }
            Err(e) => log::warn!("{}: no kernel thread for its TAP: {e}", h.name()),
        }
    }
}

const SYS_CLASS_NET: &str = "/sys/class/net";

/// Whether the bridge snoops multicast, in which case no TAP is kept: disabling a port leaves
/// the group memberships learned on it (only a port going down clears them), so a spare would
/// pass its last client's groups on to the next. wsnic's own bridge never snoops; an adopted
/// one may (`ip link add … type bridge` turns it on). Asked of the kernel at most once a
/// second; said once at info.
#[derive(Default)]
struct Snooping {
    known: Option<(Instant, bool)>,
    told: bool,
    told_unknown: bool,
}

impl Snooping {
    fn on(&mut self, nl: &mut Netlink, bridge: u32, now: Instant) -> bool {
        if let Some((at, on)) = self.known {
            if now.saturating_duration_since(at) < Duration::from_secs(1) {
                return on;
            }
        }
        let on = match nl.bridge_snooping(bridge) {
            Ok(on) => on,
            Err(e) => {
                // Not known: keep nothing this time.
                if std::mem::replace(&mut self.told_unknown, true) {
                    log::debug!("reaper: is the bridge snooping multicast? {e}");
                } else {
                    log::info!("reaper: cannot tell whether the bridge snoops multicast, so no spare is kept: {e}");
                }
                self.known = Some((now, true));
                return true;
            }
        };
        self.known = Some((now, on));
        if on && !self.told {
            self.told = true;
            log::info!(
                "reaper: the bridge snoops multicast, so finished clients' TAPs are deleted rather than kept as \
                 spares (a spare would keep its last client's multicast groups); with snooping off, spares make \
                 reconnecting faster"
            );
        }
        on
    }
}

/// A finished TAP whose bridge port could not be disabled is deleted, not kept. Said once at
/// info, and once more if the reason is STP: on a bridge that runs the kernel's STP (an adopted
/// one; wsnic's own never does) every port's state is STP's, the kernel refuses each request
/// with `EBUSY`, and no spare is ever kept, which costs every new client a TAP of its own.
#[derive(Default)]
struct Unkept {
    told: bool,
    told_stp: bool,
}

impl Unkept {
    fn say(&mut self, t: &Tap, e: &io::Error) {
        let stp = e.raw_os_error() == Some(libc::EBUSY);
        if self.told && (!stp || self.told_stp) {
            log::debug!("reaper: {}: {e}", t.name());
            return;
        }
        self.told = true;
        self.told_stp |= stp;
        let why = if stp { " (the kernel refuses this while the bridge runs STP: then no TAP is kept)" } else { "" };
        log::info!(
            "reaper: {}: its bridge port could not be disabled, so it is deleted rather than kept as a spare: {e}{why}",
            t.name()
        );
    }
}

/// Read and discard what the kernel queued on `tap` before its bridge port stopped forwarding.
fn drain(tap: &Tap) {
    let mut buf = [0u8; 2048];
    // A read of a frame larger than the buffer fails (EINVAL) or truncates: it is gone either way.
    for _ in 0..4096 {
        match tap.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => {}
        }
    }
}

/// Delete `doomed` with one request for the group, then close the descriptors.
fn delete(nl: &mut Netlink, group: u32, doomed: &mut Vec<Tap>) {
    if doomed.is_empty() {
        return;
    }
    let mut grouped = 0;
    for t in doomed.iter() {
        match nl.set_down_in_group(t.index(), group) {
            Ok(()) => grouped += 1,
            Err(e) => log::debug!("reaper: {}: {e}", t.name()),
        }
    }
    if grouped > 0 {
        if let Err(e) = nl.delete_group(group) {
            // The descriptors still close below, one grace period each: slower, not wrong.
            log::warn!("reaper: deleting {grouped} TAP devices at once failed: {e}");
        }
    }
    doomed.clear();
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
