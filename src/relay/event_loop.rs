//! The event loop: accepts connections, runs the opening handshake, creates a TAP per
//! client, and schedules every client's frame path fairly.
//!
//! Tokens: slot `i` uses `2i` for its socket and `2i+1` for its TAP. Clients that used up
//! their per-pass budget sit in a run queue and are served again before the loop sleeps.
//! Timers (handshake timeout, keepalive, lingering closes) are checked by a sweep once a
//! second, which costs nothing per frame. A connection that is done (a client after its
//! Close, a refused handshake, an HTTP answer) lingers in its slot ([`super::linger`]) until
//! the peer closes too or `LINGER` passes, so that closing never resets what it was last sent.
//! Shutdown sends every client a Close (1001) and keeps the loop running until they are
//! flushed and closed, for `LINGER` at most.
//!
//! With `workers = N` there are N of these, one per thread, each with its own listening
//! socket on the same port (SO_REUSEPORT): a worker owns the connections the kernel hands it
//! and their TAPs. What they share is in [`super::shared`]; commands from the main thread and
//! from other workers (shutdown, reload, takeovers) arrive through a `mio::Waker`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::bufpool::BufPool;
use super::linger::{self, Lingering};
use super::pipe::{Ending, Pipe, Progress};
use super::policy::{Policy, Takeover};
use super::reaper::Reaper;
use super::shared::{Command, Report, Shared};
use super::transport::Transport;
use crate::admission::{client_ip, forwarded_client, limit_key, Admission, Refused};
use crate::logging::RateLimited;
use crate::sys::netlink::Netlink;
use crate::sys::tap::Tap;
use crate::ws::handshake::{self, Outcome, Refusal};
use crate::ws::{close_code, Role};

const LISTENER: Token = Token(usize::MAX);
const LISTENER_TLS: Token = Token(usize::MAX - 2);
/// The worker's mailbox has commands (see [`Shared::send`]).
pub const WAKER: Token = Token(usize::MAX - 1);
/// Connections still in their handshake, at most; more are closed at once (each holds a socket
/// and up to 8 KiB until `handshake_timeout`).
const MAX_PENDING: usize = 1024;
/// A MAC moves to a new connection of the same client only if its old connection has been
/// silent this long (a browser VM that reconnected; an active one is not evicted).
const TAKEOVER_SILENCE: Duration = Duration::from_secs(5);
/// How long a closing connection may take to flush its last frames, and then how long it may
/// linger for the peer to close its side; also how long a shutdown waits for its clients.
const LINGER: Duration = Duration::from_secs(2);
/// Connections lingering at once, at most; past it, a finished one is closed as it is.
const MAX_LINGERING: usize = 1024;
const TICK: Duration = Duration::from_secs(1);
/// A client that sends its TAP this many frames between two ticks is busy: its TAP gets a
/// kernel thread (`tap_threads`). An interactive client stays well under it, and keeps the
/// lower latency of having the kernel handle its frames inside the event loop's `write()`.
const BUSY_FRAMES_PER_TICK: u64 = 1000;
/// Ports a Linux bridge holds (BR_MAX_PORTS less one).
const BRIDGE_PORTS: usize = 1023;
/// TAPs of finished clients kept (on the bridge, port disabled) for new clients, at most, and how long.
const SPARE_TAPS: usize = 32;
const SPARE_TTL: Duration = Duration::from_secs(2);
/// Finished clients' TAPs waiting for the reaper before a worker stops accepting. Small on
/// purpose: while the reaper is behind, new clients find no spare and get new TAPs, whose
/// creation and later deletion put it further behind (see docs/design.md).
const MAX_REAPING: usize = 16;
/// How often a worker that stopped accepting looks again whether the reaper has caught up.
const REAPING_RECHECK: Duration = Duration::from_millis(5);
/// How often a worker that is shutting down looks whether its clients are all closed.
const STOP_RECHECK: Duration = Duration::from_millis(20);
/// Free buffers kept for reuse.
const POOL_KEEP_BYTES: usize = 16 << 20;

/// What the event loop needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TAP name pattern, e.g. `wsnic%d`.
    pub tap_pattern: String,
    pub max_frame: usize,
    /// TAPs with `IFF_VNET_HDR` and TCP/UDP segmentation offload.
    pub tap_offload: bool,
    /// TAPs with a NAPI context, which gets a kernel thread once its client is busy.
    pub tap_threads: bool,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub admission: Admission,
    /// Bridge port isolation for every TAP (clients cannot reach each other).
    pub isolation: bool,
    /// Bytes per second per client and direction.
    pub rate_limit: Option<u64>,
    /// Who may see the status page and the metrics (they reveal client addresses).
    pub status_allow: Vec<crate::config::IpCidr>,
    /// Configuration summary for the status page.
    pub summary: Vec<(&'static str, String)>,
}

/// A connection still in its opening handshake.
struct Pending {
    sock: Transport,
    peer: SocketAddr,
    head: Vec<u8>,
    since: Instant,
}

enum Slot {
    Free,
    Pending(Pending),
    Client(Box<Pipe>),
    Lingering(Lingering),
}

pub struct Relay {
    poll: Poll,
    /// ws:// (None when `ws_server_port=0`).
    listener: Option<TcpListener>,
    /// wss://, with the TLS configuration new connections use (SIGHUP may replace it).
    tls_listener: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    /// This worker's index (0..workers).
    me: usize,
    shared: Arc<Shared>,
    settings: Settings,
    slots: Vec<Slot>,
    queued: Vec<bool>,
    free: Vec<usize>,
    /// Slots emptied during this pass; reusable only after it (stale events may follow).
    freed: Vec<usize>,
    runq: Vec<usize>,
    runq_spare: Vec<usize>,
    /// Lingering connections whose discard budget ran out with input perhaps left: progressed
    /// again on the next pass (no readiness event need come for input already there).
    linger_again: Vec<usize>,
    pool: BufPool,
    clients: usize,
    bridge_index: u32,
    /// Connection id → slot, for takeovers.
    by_id: std::collections::HashMap<u64, usize>,
    /// Handshakes in progress on this worker (limits on them are per worker).
    pending: usize,
    /// Handshakes in progress per peer address (not for trusted proxies), so one address
    /// cannot hold every handshake slot.
    pending_per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
    /// Throttled pipes to run again: (when, slot, connection id).
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize, u64)>>,
    policy: Policy,
    /// Handshakes refused, by reason (index into `Refused::ALL`).
    pub refused: [u64; 6],
    /// Counters of every connection that has ended (live ones are added when asked).
    totals: super::pipe::Stats,
    /// One log limiter per refusal reason, so a flood of one kind cannot hide another.
    refusal_log: [RateLimited; 6],
    pending_log: RateLimited,
    reaping_log: RateLimited,
    /// Deletes the TAPs of finished clients off this thread (started by `run`).
    reaper: Option<Reaper>,
    /// New connections are left in the listen queue until the reaper catches up.
    accept_paused: bool,
    /// Slots holding a lingering connection.
    lingering: usize,
    /// An accept failed (out of descriptors, say): the tick tries again.
    accept_retry: bool,
    /// Shutting down since then: no new connections; the loop ends once every client is
    /// closed, or `LINGER` after this.
    stopping: Option<Instant>,
}

fn sock_token(i: usize) -> Token {
    Token(2 * i)
}
fn tap_token(i: usize) -> Token {
    Token(2 * i + 1)
}

impl Relay {
    /// Worker `me`: `poll` is the one its waker (in `shared`) was registered with, under
    /// [`WAKER`]; the listeners are this worker's own sockets.
    pub fn new(
        me: usize,
        poll: Poll,
        listener: Option<std::net::TcpListener>,
        tls_listener: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
        settings: Settings,
        policy: Policy,
        shared: Arc<Shared>,
    ) -> io::Result<Relay> {
        let mio_listener = |l: std::net::TcpListener, token| -> io::Result<TcpListener> {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry().register(&mut l, token, Interest::READABLE)?;
            Ok(l)
        };
        let listener = listener.map(|l| mio_listener(l, LISTENER)).transpose()?;
        let tls_listener = tls_listener.map(|(l, c)| mio_listener(l, LISTENER_TLS).map(|l| (l, c))).transpose()?;
        let size = Pipe::buffer_size_for(settings.max_frame, settings.tap_offload);
        let pool = BufPool::new(size, (POOL_KEEP_BYTES / size).max(4));
        Ok(Relay {
            poll,
            listener,
            tls_listener,
            me,
            shared,
            settings,
            slots: Vec::new(),
            queued: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            runq: Vec::new(),
            runq_spare: Vec::new(),
            linger_again: Vec::new(),
            pool,
            clients: 0,
            bridge_index: 0,
            by_id: Default::default(),
            pending: 0,
            pending_per_ip: Default::default(),
            timers: Default::default(),
            policy,
            refused: [0; 6],
            refusal_log: std::array::from_fn(|_| RateLimited::new(Duration::from_secs(10))),
            pending_log: RateLimited::new(Duration::from_secs(10)),
            reaping_log: RateLimited::new(Duration::from_secs(10)),
            totals: Default::default(),
            reaper: None,
            accept_paused: false,
            lingering: 0,
            accept_retry: false,
            stopping: None,
        })
    }

    /// Bind the listening socket with a backlog of 1024, so bursts of browsers reconnecting
    /// at once queue in the kernel instead of being refused. `reuse_port`: one of several
    /// workers' sockets on the same address (SO_REUSEPORT; the kernel spreads connections).
    /// `congestion`: a TCP congestion control, which the accepted connections inherit.
    pub fn bind(addr: SocketAddr, reuse_port: bool, congestion: Option<&str>) -> io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        if let Some(name) = congestion {
            s.set_tcp_congestion(name.as_bytes())?;
        }
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    }

    /// Use `cfg` for new wss:// connections (a reloaded certificate).
    pub fn set_tls(&mut self, cfg: Arc<rustls::ServerConfig>) {
        if let Some((_, c)) = &mut self.tls_listener {
            *c = cfg;
        }
    }

    /// Run until [`Command::Shutdown`], which closes every client. `netlink` (this worker's
    /// own socket) attaches each new TAP to bridge `bridge_index`.
    pub fn run(&mut self, bridge_index: u32, netlink: &mut Netlink) -> io::Result<()> {
        self.bridge_index = bridge_index;
        if self.reaper.is_none() {
            match Reaper::start(bridge_index, self.spares_to_keep(), SPARE_TTL) {
                Ok(r) => self.reaper = Some(r),
                // TAPs then close on this thread: correct, only slower.
                Err(e) => log::warn!("cannot start the TAP reaper thread: {e}"),
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wake = self.timers.peek().map_or(next_tick, |t| t.0 .0.min(next_tick));
            let mut timeout = if self.runq.is_empty() && self.linger_again.is_empty() {
                wake.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if self.accept_paused {
                timeout = timeout.min(REAPING_RECHECK);
            }
            if self.stopping.is_some() {
                timeout = timeout.min(STOP_RECHECK);
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            while let Some(std::cmp::Reverse((t, i, id))) = self.timers.peek().copied() {
                if t > now {
                    break;
                }
                self.timers.pop();
                if matches!(&self.slots[i], Slot::Client(c) if c.id == id) {
                    self.schedule(i);
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER if self.stopping.is_none() => self.accept(now, false),
                    LISTENER_TLS if self.stopping.is_none() => self.accept(now, true),
                    LISTENER | LISTENER_TLS => {}
                    WAKER => {
                        if self.commands(now) && self.stopping.is_none() {
                            self.begin_stop(now);
                        }
                    }
                    Token(t) => {
                        let i = t / 2;
                        match self.slots.get_mut(i) {
                            Some(Slot::Pending(_)) => self.handshake(i, now, netlink),
                            Some(Slot::Client(c)) => {
                                if t % 2 == 1 {
                                    c.tap_readable |= ev.is_readable();
                                    c.tap_writable |= ev.is_writable();
                                } else {
                                    c.sock_readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                                    c.sock_writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                                }
                                self.schedule(i);
                            }
                            Some(Slot::Lingering(_)) => self.progress_lingering(i),
                            _ => {}
                        }
                    }
                }
            }
            for i in std::mem::take(&mut self.linger_again) {
                self.progress_lingering(i);
            }
            self.run_queue(now);
            for t in std::mem::take(&mut self.policy.takeovers) {
                let Takeover { old, old_worker, new, mac } = t;
                if old_worker == self.me {
                    self.takeover(old, new, self.me, mac, now);
                } else {
                    self.shared.send(old_worker, Command::Takeover { old, new, new_worker: self.me, mac });
                }
            }
            self.free.append(&mut self.freed);
            if self.accept_paused && !self.reaper_full() && self.stopping.is_none() {
                self.accept_paused = false;
                self.accept(now, false);
                self.accept(now, true);
            }
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            if let Some(since) = self.stopping {
                if (self.clients == 0 && self.lingering == 0) || now.saturating_duration_since(since) >= LINGER {
                    self.shutdown();
                    return Ok(());
                }
            }
        }
    }

    /// Commands from the mailbox; true for [`Command::Shutdown`].
    fn commands(&mut self, now: Instant) -> bool {
        let mut stop = false;
        for cmd in self.shared.take_commands(self.me) {
            match cmd {
                Command::Shutdown => stop = true,
                Command::Reload { settings, anti_spoofing, tls, done } => {
                    self.update(*settings, anti_spoofing);
                    if let Some(tls) = tls {
                        self.set_tls(tls);
                    }
                    let _ = done.send(());
                }
                Command::Takeover { old, new, new_worker, mac } => self.takeover(old, new, new_worker, mac, now),
                Command::Close { conn, code, reason } => {
                    if let Some(&i) = self.by_id.get(&conn) {
                        self.end(i, Ending::new(reason, Some(code)), now);
                    }
                }
            }
        }
        stop
    }

    /// Connection `new` (on worker `new_worker`) claimed `mac` from `old`, ours: if `old` has
    /// gone silent it is a reconnect and `old` is closed; else `old` keeps the MAC and `new` is
    /// closed (clients behind one NAT share an address).
    fn takeover(&mut self, old: u64, new: u64, new_worker: usize, mac: crate::wire::Mac, now: Instant) {
        let Some(&i) = self.by_id.get(&old) else { return };
        let stale = matches!(&self.slots[i], Slot::Client(c) if c.silent_for(now) >= TAKEOVER_SILENCE);
        const REFUSED: &str = "its MAC belongs to another active connection";
        if stale {
            let e = Ending::new(
                "its MAC was taken over by a new connection of the same client",
                Some(close_code::GOING_AWAY),
            );
            self.end(i, e, now);
        } else if new_worker != self.me {
            self.policy.restore_owner(mac, old);
            self.shared.send(new_worker, Command::Close { conn: new, code: close_code::POLICY, reason: REFUSED });
        } else if let Some(&j) = self.by_id.get(&new) {
            self.policy.restore_owner(mac, old);
            self.end(j, Ending::new(REFUSED, Some(close_code::POLICY)), now);
        }
    }

    /// A handshake from `ip` is over (upgraded, refused, timed out or gone).
    fn pending_done(&mut self, ip: std::net::IpAddr) {
        self.pending -= 1;
        if let Some(n) = self.pending_per_ip.get_mut(&limit_key(ip)) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_ip.remove(&limit_key(ip));
            }
        }
    }

    fn schedule(&mut self, i: usize) {
        if !self.queued[i] {
            self.queued[i] = true;
            self.runq.push(i);
        }
    }

    /// Serve every queued client once; those with work left stay queued for the next pass.
    fn run_queue(&mut self, now: Instant) {
        let batch = std::mem::replace(&mut self.runq, std::mem::take(&mut self.runq_spare));
        for &i in &batch {
            self.queued[i] = false;
            let Slot::Client(c) = &mut self.slots[i] else { continue };
            let progress = c.run(now, &mut self.pool, &mut self.policy);
            if let Some(t) = c.wake_at.take() {
                self.timers.push(std::cmp::Reverse((t, i, c.id)));
            }
            match progress {
                Progress::Idle if c.closing.is_some() && c.pending_output() == 0 => {
                    let reason = c.ending.take().map_or_else(|| "closed".to_string(), |e| e.reason);
                    self.finish(i, &reason);
                }
                Progress::Idle => {}
                Progress::Again => self.schedule(i),
                Progress::End(e) => self.end(i, e, now),
            }
        }
        let mut batch = batch;
        batch.clear();
        self.runq_spare = batch; // two vectors, swapped: no allocation per pass
    }

    /// Too many finished clients' TAPs wait for the reaper (it fell behind a burst of
    /// disconnections): each is still a bridge port, and none can be a spare until it is done.
    fn reaper_full(&self) -> bool {
        self.reaper.as_ref().is_some_and(|r| r.backlog() >= MAX_REAPING)
    }

    fn accept(&mut self, now: Instant, tls: bool) {
        loop {
            if self.reaper_full() {
                // The connections wait in the kernel's listen queue (1024) until it catches up;
                // then the TAPs it finishes are spares for them, rather than each getting a new
                // one that the reaper must later delete too.
                if !self.accept_paused {
                    self.accept_paused = true;
                    if let Some(held) = self.reaping_log.allow(now) {
                        let n = self.reaper.as_ref().map_or(0, Reaper::backlog);
                        log::info!(
                            "{n} finished clients' TAPs still being removed; new connections wait ({held} more not logged)"
                        );
                    }
                }
                return;
            }
            let accepted = match (tls, &self.listener, &self.tls_listener) {
                (false, Some(l), _) => l.accept(),
                (true, _, Some((l, _))) => l.accept(),
                _ => return,
            };
            let (sock, peer) = match accepted {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection waits in the backlog. The listener is
                    // edge-triggered and may get no new event for it: the tick tries again.
                    log::warn!("accept: {e}");
                    self.accept_retry = true;
                    return;
                }
            };
            if self.pending >= MAX_PENDING {
                if let Some(held) = self.pending_log.allow(now) {
                    log::warn!("{MAX_PENDING} handshakes pending; closing new connections ({held} more not logged)");
                }
                continue; // dropping `sock` closes it
            }
            let per_ip_cap = (2 * self.settings.admission.max_per_ip).max(16);
            let proxied = self.settings.admission.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
            if !proxied && self.pending_per_ip.get(&limit_key(peer.ip())).is_some_and(|&n| n >= per_ip_cap) {
                if let Some(held) = self.pending_log.allow(now) {
                    log::warn!(
                        "{}: {per_ip_cap} handshakes pending from this address; closing more ({held} not logged)",
                        peer.ip()
                    );
                }
                continue;
            }
            let _ = sock.set_nodelay(true);
            let i = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(Slot::Free);
                    self.queued.push(false);
                    self.slots.len() - 1
                }
            };
            let mut sock = match &self.tls_listener {
                Some((_, cfg)) if tls => match Transport::tls_server(sock, cfg.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        log::warn!("{peer}: TLS: {e}");
                        self.free.push(i);
                        continue;
                    }
                },
                _ => Transport::Plain(sock),
            };
            if let Err(e) =
                self.poll.registry().register(&mut sock, sock_token(i), Interest::READABLE | Interest::WRITABLE)
            {
                log::warn!("register {peer}: {e}");
                self.free.push(i);
                continue;
            }
            self.slots[i] = Slot::Pending(Pending { sock, peer, head: Vec::new(), since: now });
            self.pending += 1;
            *self.pending_per_ip.entry(limit_key(peer.ip())).or_default() += 1;
            log::debug!("{peer}: TCP connection accepted");
        }
    }

    /// Read the request head; answer it; on success the slot becomes a client with a TAP.
    fn handshake(&mut self, i: usize, now: Instant, netlink: &mut Netlink) {
        let Slot::Pending(p) = &mut self.slots[i] else { return };
        // TLS handshake records that a full socket did not take earlier go out on this event
        // (it may be the writable one); plain TCP has none.
        let _ = p.sock.flush_tls();
        let mut chunk = [0u8; 4096];
        let outcome = loop {
            match p.sock.read(&mut chunk) {
                Ok(0) => break Ok(None),
                Ok(n) => {
                    p.head.extend_from_slice(&chunk[..n]);
                    match handshake::parse_request(&p.head) {
                        Outcome::Partial => continue,
                        o => break Ok(Some(o)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        let Slot::Pending(mut p) = std::mem::replace(&mut self.slots[i], Slot::Free) else { unreachable!() };
        self.pending_done(p.peer.ip());
        match outcome {
            Err(e) if p.sock.is_tls() => {
                // The usual wss:// setup problem (certificate not trusted, plain HTTP to the TLS
                // port) shows here: worth a line, rate-limited.
                if let Some(held) = self.pending_log.allow(now) {
                    log::info!("{}: TLS handshake failed: {e} ({held} more not logged)", p.peer);
                }
                self.freed.push(i);
            }
            Err(_) | Ok(None) => {
                log::debug!("{}: closed during handshake", p.peer);
                self.freed.push(i);
            }
            Ok(Some(Outcome::Refuse(r))) => self.refuse(i, p, Refused::Malformed, r, now),
            Ok(Some(Outcome::Plain { path, forwarded_for, proxied })) => {
                // Through a proxy the TCP peer is the proxy (often on loopback, which
                // `status_allow` lets in): the client is the one the trusted proxy names, and
                // without a trusted proxy naming one, nobody is let in.
                let trusted = &self.settings.admission.trusted_proxies;
                let client = match (proxied, forwarded_for) {
                    (false, _) => Some(p.peer.ip()),
                    (true, Some(xff)) if trusted.iter().any(|c| c.contains(p.peer.ip())) => {
                        forwarded_client(&xff, trusted)
                    }
                    (true, _) => None,
                };
                self.serve_http(i, p, &path, client, now)
            }
            Ok(Some(Outcome::Partial)) => unreachable!(),
            Ok(Some(Outcome::Upgrade(u))) => {
                let ip = client_ip(p.peer.ip(), u.forwarded_for.as_deref(), &self.settings.admission.trusted_proxies);
                // Counted at once, across workers; given back if the TAP cannot be made.
                let admitted = self.shared.lock().admit(&self.settings.admission, &u, ip);
                if let Err((why, r)) = admitted {
                    return self.refuse(i, p, why, r, now);
                }
                let tap = match self.tap_for_client(netlink) {
                    Ok(t) => t,
                    Err(e) => {
                        log::error!("{}: cannot set up a TAP device: {e}", p.peer);
                        self.shared.lock().release(ip);
                        let r = Refusal::new(503, "wsnic: cannot create a network device\n");
                        return self.refuse(i, p, Refused::TapFailed, r, now);
                    }
                };
                // Registered only now that the device exists: frames queued for it from the
                // first moment wake us (the original registered before TUNSETIFF).
                if let Err(e) = self.poll.registry().register(
                    &mut SourceFd(&tap.as_raw_fd()),
                    tap_token(i),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    log::error!("{}: register TAP: {e}", p.peer);
                    self.shared.lock().release(ip);
                    if let Some(r) = &self.reaper {
                        r.discard(tap); // closing it here would block this thread for a grace period
                    }
                    return self.refuse(i, p, Refused::TapFailed, Refusal::new(503, "wsnic: internal error\n"), now);
                }
                let via = if ip == p.peer.ip() { String::new() } else { format!(" for {ip}") };
                log::info!("{}{via} connected on {} (path {})", p.peer, tap.name(), redact(&u.target));
                let id = self.shared.next_id();
                let mut c = Box::new(Pipe::new(id, p.sock, tap, p.peer, Role::Server, self.settings.max_frame, now));
                c.client_ip = ip;
                if let Some(rate) = self.settings.rate_limit {
                    c.shape(rate, now);
                }
                c.preload(&u.response(), &p.head[u.head_len..], &mut self.pool);
                p.head = Vec::new();
                self.slots[i] = Slot::Client(c);
                self.clients += 1;
                self.by_id.insert(id, i);
                self.policy.opened(id, ip);
                self.schedule(i);
            }
        }
    }

    /// A TAP for a new client, on the bridge, up and forwarding: a spare the reaper kept (its
    /// port only has to forward again), or a new one.
    fn tap_for_client(&self, netlink: &mut Netlink) -> io::Result<Tap> {
        if let Some(t) = self.reaper.as_ref().and_then(Reaper::spare) {
            match netlink.set_port_forwarding(t.index(), true) {
                Ok(()) => return Ok(t),
                Err(e) => {
                    log::debug!("spare {}: {e}", t.name());
                    if let Some(r) = &self.reaper {
                        r.discard(t); // kept again, it would fail the next client the same way
                    }
                }
            }
        }
        // A NAPI context only where a busy client's TAP can get a thread: it costs time without.
        let napi = self.settings.tap_threads && self.reaper.as_ref().is_some_and(Reaper::threads_available);
        let t = Tap::open(&self.settings.tap_pattern, self.settings.tap_offload, napi)?;
        match self.set_up_new(&t, netlink) {
            Ok(()) => Ok(t),
            Err(e) => {
                if let Some(r) = &self.reaper {
                    // Never a spare: it may be half set up. Closing it here would block this
                    // thread for a grace period.
                    r.discard(t);
                }
                Err(e)
            }
        }
    }

    /// A new TAP's first setup: no IPv6, segment limit, onto the bridge (isolated first), up.
    fn set_up_new(&self, t: &Tap, netlink: &mut Netlink) -> io::Result<()> {
        // A bridge port needs no IPv6 of its own. Left on, every TAP going up would get a
        // link-local address, and the host would send DAD, MLD and router solicitations from it
        // straight to the client (and spend a kernel worker on it per connection). Netlink, not
        // the `disable_ipv6` sysctl: that write retries in a loop while another thread (the
        // reaper) holds the RTNL lock, where netlink sleeps. Before it is up, with offload, also
        // no super-frame with more segments than a pipe cuts.
        let segs = t.has_vnet_hdr().then_some(super::pipe::MAX_SEGMENTS as u32);
        netlink.prepare_port(t.index(), segs)?;
        if self.settings.isolation {
            // Isolated before it is up: no frame crosses without isolation.
            netlink.attach_isolated_up(t.index(), self.bridge_index)?;
        } else {
            netlink.attach_up(t.index(), self.bridge_index)?;
        }
        Ok(())
    }

    /// A plain HTTP GET: `/healthz` for anyone; `/` (status page) and `/metrics` for a
    /// `client` in `status_allow` (None: not known); anything else gets the "this is a
    /// WebSocket relay" text.
    fn serve_http(&mut self, i: usize, p: Pending, target: &str, client: Option<IpAddr>, now: Instant) {
        let path = target.split('?').next().unwrap_or("/");
        let allowed = client.is_some_and(|ip| self.settings.status_allow.iter().any(|c| c.contains(ip)));
        let response = match path {
            "/healthz" => handshake::http_response(
                200,
                "text/plain; charset=utf-8",
                b"ok
",
            ),
            "/" | "/metrics" if !allowed => handshake::http_response(
                403,
                "text/plain; charset=utf-8",
                b"wsnic: status is not shown to this address (status_allow)
",
            ),
            "/" => handshake::http_response(
                200,
                "text/html; charset=utf-8",
                crate::status::html(&self.snapshot(now)).as_bytes(),
            ),
            "/metrics" => handshake::http_response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::status::metrics(&self.snapshot(now)).as_bytes(),
            ),
            _ => handshake::plain_http_refusal().response(),
        };
        // Any other path may be the token (ws://HOST/SECRET), which never goes to the log.
        let shown = if matches!(path, "/" | "/healthz" | "/metrics") { path.to_string() } else { redact(target) };
        log::debug!("{}: HTTP GET {shown}", p.peer);
        self.linger(i, p.sock, response, true, now);
    }

    /// Slot `i`'s connection is done: write `out` (what we still owe it) as the socket takes
    /// it, shut our side down, and keep the socket until the peer closes or `LINGER` passes
    /// (see [`super::linger`]); with `wait_for_peer` false (a client that sent its Close), only
    /// until the input there is now has been read. Past `MAX_LINGERING`, only what the socket
    /// takes at once.
    fn linger(&mut self, i: usize, sock: Transport, out: Vec<u8>, wait_for_peer: bool, now: Instant) {
        let mut l = Lingering::new(sock, out, wait_for_peer, now + LINGER);
        let state = l.progress();
        if state == linger::State::Done || self.lingering >= MAX_LINGERING {
            // Dropped: closing the socket also takes it out of the poll set.
            self.slots[i] = Slot::Free;
            self.freed.push(i);
            return;
        }
        self.slots[i] = Slot::Lingering(l);
        self.lingering += 1;
        if state == linger::State::Busy {
            self.linger_again.push(i);
        }
    }

    /// Move lingering connection `i` on (on an event of its socket, or again after its discard
    /// budget ran out); a slot that no longer lingers is left alone.
    fn progress_lingering(&mut self, i: usize) {
        let Some(Slot::Lingering(l)) = self.slots.get_mut(i) else { return };
        match l.progress() {
            linger::State::Done => self.unlinger(i),
            linger::State::Busy => {
                if !self.linger_again.contains(&i) {
                    self.linger_again.push(i);
                }
            }
            linger::State::Waiting => {}
        }
    }

    /// A lingering connection is over: close it (which takes it out of the poll set), free its
    /// slot.
    fn unlinger(&mut self, i: usize) {
        if let Slot::Lingering(_) = std::mem::replace(&mut self.slots[i], Slot::Free) {
            self.lingering -= 1;
            self.freed.push(i);
        }
    }

    /// Shutdown begins: every client is sent a Close (1001) and flushed as its socket allows;
    /// handshakes in progress are dropped; no connection is accepted any more.
    fn begin_stop(&mut self, now: Instant) {
        self.stopping = Some(now);
        for i in 0..self.slots.len() {
            match &self.slots[i] {
                Slot::Pending(p) => {
                    let ip = p.peer.ip();
                    self.slots[i] = Slot::Free;
                    self.pending_done(ip);
                    self.freed.push(i);
                }
                Slot::Client(_) => {
                    self.end(i, Ending::new("server shutting down", Some(close_code::GOING_AWAY)), now);
                }
                _ => {}
            }
        }
    }

    /// This worker's clients and counters, as of `now`.
    fn report(&self, now: Instant) -> Report {
        use crate::relay::policy::unix_now;
        use crate::status::ClientRow;
        let mut totals = self.totals;
        let mut clients = Vec::with_capacity(self.clients);
        // Addresses not cached in the connection's state, looked up under the lock in one go
        // (and only then: formatting the rows needs no lock).
        let mut bound = std::collections::HashMap::new();
        let unknown = || {
            self.slots.iter().filter_map(|s| match s {
                Slot::Client(c) if c.state.ip.is_none() => Some(c.id),
                _ => None,
            })
        };
        if self.policy.dhcp.is_some() && unknown().next().is_some() {
            if let Some(d) = &self.shared.lock().dhcp {
                bound.extend(unknown().filter_map(|id| Some((id, d.bound_ip(id, unix_now())?))));
            }
        }
        for slot in &self.slots {
            if let Slot::Client(c) = slot {
                totals.add(&c.stats);
                let ip = c.state.ip.or_else(|| bound.get(&c.id).copied());
                clients.push(ClientRow {
                    peer: if c.client_ip == c.peer.ip() {
                        c.peer.to_string()
                    } else {
                        format!("{} via {}", c.client_ip, c.peer)
                    },
                    tap: c.tap.name().to_string(),
                    mac: c.state.mac,
                    ip,
                    connected_secs: now.saturating_duration_since(c.connected_at).as_secs(),
                    stats: c.stats,
                });
            }
        }
        Report {
            clients,
            totals,
            refused: self.refused,
            drops: self.policy.drops,
            dhcp_messages: self.policy.dhcp_messages,
        }
    }

    /// The state shown by the status page and the metrics: this worker's as of now, the other
    /// workers' as of their last report (at most a second old).
    pub fn snapshot(&self, now: Instant) -> crate::status::Snapshot {
        use crate::relay::policy::{drop_reason, unix_now};
        use crate::status::{LeaseRow, Snapshot};
        let mut r = self.report(now);
        if self.shared.workers() > 1 {
            r.merge(&self.shared.others(self.me));
        }
        let unix = unix_now() as i64;
        let (leases, pool) = match &self.shared.lock().dhcp {
            Some(d) => {
                let leases = d
                    .leases()
                    .map(|l| LeaseRow {
                        ip: l.ip,
                        mac: l.mac,
                        hostname: String::from_utf8_lossy(&l.hostname).into_owned(),
                        expires_in: l.expires as i64 - unix,
                        connected: l.conn.is_some(),
                    })
                    .collect();
                (leases, Some((d.pool_size(), d.free_count(unix as u64))))
            }
            None => (Vec::new(), None),
        };
        const DHCP_TYPES: [&str; 9] =
            ["other", "discover", "offer", "request", "decline", "ack", "nak", "release", "inform"];
        Snapshot {
            uptime_secs: now.saturating_duration_since(self.shared.started).as_secs(),
            clients: r.clients,
            leases,
            totals: r.totals,
            connections_total: self.shared.connections_total(),
            refused: Refused::ALL.iter().zip(r.refused).map(|(x, n)| (x.label(), n)).collect(),
            policy_drops: drop_reason::LABELS.iter().copied().zip(r.drops).collect(),
            dhcp_messages: DHCP_TYPES.iter().copied().zip(r.dhcp_messages).collect(),
            pool,
            config: self.settings.summary.clone(),
        }
    }

    fn refuse(&mut self, i: usize, p: Pending, why: Refused, r: Refusal, now: Instant) {
        let k = Refused::ALL.iter().position(|x| *x == why).expect("listed");
        self.refused[k] += 1;
        if let Some(held) = self.refusal_log[k].allow(now) {
            let more = if held > 0 { format!(" ({held} more refusals not logged)") } else { String::new() };
            log::info!("{}: handshake refused: {} {} ({}){more}", p.peer, r.status, r.reason, why.label());
        }
        log::debug!("{}: {}", p.peer, r.body.trim_end());
        self.linger(i, p.sock, r.response(), true, now);
    }

    /// End a client: send a Close if the reason calls for one, flush, and drop it (which
    /// closes its socket and removes its TAP) — or linger briefly until the flush completes.
    fn end(&mut self, i: usize, e: Ending, now: Instant) {
        let Slot::Client(c) = &mut self.slots[i] else { return };
        if let Some(code) = e.code {
            c.queue_close(code, &e.reason, now, &mut self.pool);
        }
        c.closing.get_or_insert(now);
        match c.flush() {
            Ok(()) if c.pending_output() > 0 => c.ending = Some(e), // linger until flushed
            _ => self.finish(i, &e.reason),
        }
    }

    fn finish(&mut self, i: usize, reason: &str) {
        let Slot::Client(mut c) = std::mem::replace(&mut self.slots[i], Slot::Free) else { return };
        c.abandon_undelivered();
        let s = c.stats;
        log::info!(
            "{} on {} disconnected after {:.1}s: {reason}; client→tap {} frames {} bytes, tap→client {} frames {} bytes, answered {}, dropped {} (text {}, runt {}, tap error {}, oversize {}, policy {}, offload {})",
            c.peer,
            c.tap.name(),
            c.connected_at.elapsed().as_secs_f64(),
            s.to_tap_frames,
            s.to_tap_bytes,
            s.to_ws_frames,
            s.to_ws_bytes,
            s.answered,
            s.drops(),
            s.drop_text,
            s.drop_runt,
            s.drop_tap_error,
            s.drop_oversize,
            s.drop_policy,
            s.drop_offload,
        );
        self.totals.add(&c.stats);
        // Everything queued reached the socket: linger for the peer to close. Otherwise it has
        // not read for `LINGER` (or the shutdown's time is up): close now.
        let flushed = c.pending_output() == 0;
        let wait_for_peer = !c.client_sent_close;
        c.release_idle(&mut self.pool);
        self.policy.closed(c.id, c.client_ip, &c.state);
        self.by_id.remove(&c.id);
        self.clients -= 1;
        let _ = self.poll.registry().deregister(&mut SourceFd(&c.tap.as_raw_fd()));
        let (sock, tap) = c.into_parts();
        if let Some(r) = &self.reaper {
            r.reap(tap);
        }
        if flushed {
            self.linger(i, sock, Vec::new(), wait_for_peer, Instant::now());
        } else {
            self.freed.push(i); // the socket is closed as it is
        }
    }

    /// Once a second: handshake timeouts, keepalive pings, idle timeouts, lingering closes, an
    /// accept that failed; with several workers, this one's report for the others' status pages.
    fn tick(&mut self, now: Instant) {
        self.policy.tick();
        if std::mem::take(&mut self.accept_retry) && self.stopping.is_none() && !self.accept_paused {
            self.accept(now, false);
            self.accept(now, true);
        }
        if self.shared.workers() > 1 {
            self.shared.publish(self.me, self.report(now));
        }
        let s = self.settings.clone();
        for i in 0..self.slots.len() {
            match &mut self.slots[i] {
                Slot::Lingering(l) if now >= l.until => self.unlinger(i),
                Slot::Pending(p) if now.saturating_duration_since(p.since) >= s.handshake_timeout => {
                    log::info!("{}: handshake not completed within {:?}; dropped", p.peer, s.handshake_timeout);
                    let ip = p.peer.ip();
                    self.slots[i] = Slot::Free;
                    self.pending_done(ip);
                    self.freed.push(i);
                }
                Slot::Client(c) => {
                    if let Some(since) = c.closing {
                        if c.pending_output() == 0 || now.saturating_duration_since(since) >= LINGER {
                            let reason = c.ending.take().map_or_else(|| "closed".to_string(), |e| e.reason);
                            self.finish(i, &reason);
                        }
                    } else if let Some(e) = c.tick(now, s.ping_interval, s.idle_timeout, &mut self.pool) {
                        self.end(i, e, now);
                    } else {
                        if c.tap.could_have_thread() && c.to_tap_since_tick() >= BUSY_FRAMES_PER_TICK {
                            if let Some(r) = &self.reaper {
                                r.threaded(&mut c.tap);
                            }
                        }
                        if c.pending_output() > 0 {
                            self.schedule(i);
                        }
                    }
                }
                _ => {}
            }
        }
        self.free.append(&mut self.freed);
    }

    /// The end of a shutdown (every client closed, or `LINGER` passed): a Close for any client
    /// still without one, what the socket takes at once, and every connection closed.
    fn shutdown(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if let Slot::Client(c) = &mut self.slots[i] {
                c.queue_close(close_code::GOING_AWAY, "server shutting down", now, &mut self.pool);
                let _ = c.flush();
                self.finish(i, "server shutting down");
            }
        }
        for i in 0..self.slots.len() {
            if matches!(self.slots[i], Slot::Lingering(_)) {
                self.unlinger(i);
            }
        }
    }

    /// Spares are bridge ports too: keep them only within the bridge's port limit, shared by
    /// the workers, beside `max_clients`.
    fn spares_to_keep(&self) -> usize {
        spares_within(self.settings.admission.max_clients, self.shared.workers())
    }

    /// Settings that may change while running (SIGHUP): limits, authentication, rate limit,
    /// timeouts, status access. New connections use them; a new rate limit applies to new
    /// connections only.
    pub fn update(&mut self, s: Settings, anti_spoofing: bool) {
        self.settings = Settings {
            tap_pattern: self.settings.tap_pattern.clone(),
            max_frame: self.settings.max_frame,
            tap_offload: self.settings.tap_offload,
            tap_threads: self.settings.tap_threads,
            isolation: self.settings.isolation,
            ..s
        };
        self.policy.anti_spoofing = anti_spoofing;
        if let Some(r) = &self.reaper {
            r.set_keep(self.spares_to_keep()); // max_clients may have changed
        }
    }
}

/// Spares per worker that fit beside `max_clients` in the bridge's port limit.
fn spares_within(max_clients: usize, workers: usize) -> usize {
    SPARE_TAPS.min(BRIDGE_PORTS.saturating_sub(max_clients) / workers.max(1))
}

/// The request target with any token hidden, for the log.
fn redact(target: &str) -> String {
    match target.split_once('?') {
        Some((path, q)) if q.contains("token=") => format!("{path}?<redacted>"),
        _ if target.len() > 1 => "/<path>".to_string(),
        _ => target.to_string(),
    }
}
