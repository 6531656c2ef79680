//! What the event loops (workers) share, and the only place they meet: one mutex over the
//! state that must be global — the DHCP engine, the anti-spoofing maps, the admission counts
//! — plus lock-free pieces read on the frame path (the DHCP engine's epoch, mirrored in an
//! atomic) or bumped once per connection (connection ids), each worker's mailbox (a
//! `mio::Waker` and a queue of [`Command`]s), and each worker's report for the status page,
//! published once a second.
//!
//! The lock is taken on connect and disconnect, on DHCP messages, on a connection's first
//! frame (its MAC lock), when a cached anti-spoofing verdict went stale (the DHCP epoch
//! moved), once a second, and for the status page — never for an ordinary frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mio::Waker;

use super::event_loop::Settings;
use super::pipe::Stats;
use crate::admission::{limit_key, Admission, Refused};
use crate::dhcp::server::{Lease, Server};
use crate::dhcp::store;
use crate::status::ClientRow;
use crate::wire::Mac;
use crate::ws::handshake::{Refusal, Upgrade};

/// A message to one worker, delivered through its mailbox.
pub enum Command {
    /// SIGINT/SIGTERM: close every client (1001), drop every TAP, return from `run`.
    Shutdown,
    /// SIGHUP: new settings (and a new TLS configuration for wss://); `done` is signalled
    /// once they are in force, so the reload is logged only when every worker has them.
    Reload {
        settings: Box<Settings>,
        anti_spoofing: bool,
        tls: Option<Arc<rustls::ServerConfig>>,
        done: std::sync::mpsc::Sender<()>,
    },
    /// Connection `new` (on worker `new_worker`) claimed `mac`, which connection `old` — on
    /// the worker receiving this — holds: close `old` if it has gone silent, else give the MAC
    /// back to it and have `new` closed.
    Takeover { old: u64, new: u64, new_worker: usize, mac: Mac },
    /// Close connection `conn` (a takeover refused on another worker).
    Close { conn: u64, code: u16, reason: &'static str },
}

/// One worker's address: wake it after queueing a command.
pub struct Mailbox {
    waker: Waker,
    inbox: Mutex<Vec<Command>>,
}

/// A worker's counters and clients as of its last report (at most a second old).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub clients: Vec<ClientRow>,
    /// Every connection of this worker, ended and live.
    pub totals: Stats,
    pub refused: [u64; 6],
    pub drops: [u64; 8],
    pub dhcp_messages: [u64; 9],
}

impl Report {
    /// Add `o`'s counters and clients to these.
    pub fn merge(&mut self, o: &Report) {
        self.clients.extend(o.clients.iter().cloned());
        self.totals.add(&o.totals);
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.refused, &o.refused);
        add(&mut self.drops, &o.drops);
        add(&mut self.dhcp_messages, &o.dhcp_messages);
    }
}

/// A live connection, as the shared maps know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (a takeover needs the same one).
    pub ip: IpAddr,
    /// The worker that owns it.
    pub worker: usize,
}

/// The state behind the lock.
#[derive(Default)]
pub struct State {
    /// The DHCP engine (one pool for every worker).
    pub dhcp: Option<Server>,
    /// MAC → the connection locked to it.
    pub mac_owner: HashMap<Mac, u64>,
    /// Live connections.
    pub conns: HashMap<u64, ConnInfo>,
    /// Established clients, in all and per client address.
    clients: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl State {
    /// Admit an upgrade from `ip` if the limits allow, counting it at once (so two workers
    /// cannot both take the last place). Undo with [`State::release`]. Counted per
    /// [`limit_key`] (an IPv6 /64).
    pub fn admit(&mut self, adm: &Admission, up: &Upgrade, ip: IpAddr) -> Result<(), (Refused, Refusal)> {
        let ip = limit_key(ip);
        adm.check(up, self.clients, self.per_ip.get(&ip).copied().unwrap_or(0))?;
        self.clients += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        Ok(())
    }

    /// A client from `ip` admitted earlier is gone.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = limit_key(ip);
        self.clients -= 1;
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Is `a`'s connection from the same client address as `b`'s?
    pub fn same_client(&self, a: u64, b: u64) -> bool {
        self.conns.get(&a).map(|c| c.ip) == self.conns.get(&b).map(|c| c.ip)
    }
}

/// The lock held: dropping it publishes the DHCP engine's epoch for the lock-free readers.
pub struct Locked<'a> {
    guard: MutexGuard<'a, State>,
    epoch: &'a AtomicU64,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(d) = &self.guard.dhcp {
            self.epoch.store(d.epoch(), Ordering::Release);
        }
    }
}

pub struct Shared {
    state: Mutex<State>,
    /// The DHCP engine's epoch as of the last unlock.
    epoch: AtomicU64,
    /// The next connection id: unique across workers, never reused (leases are tied to it).
    next_id: AtomicU64,
    lease_file: Option<PathBuf>,
    /// Serialises lease-file writes (done outside the state lock: they fsync).
    saving: Mutex<()>,
    mailboxes: Vec<Mailbox>,
    reports: Vec<Mutex<Report>>,
    /// The main thread's waker: a worker that stops on its own (an error) wakes it.
    main: Waker,
    pub started: Instant,
    /// Times the lock was taken (the unit tests check the frame path takes it not at all).
    #[cfg(test)]
    pub locks: AtomicU64,
}

impl Shared {
    /// `wakers`: one per worker, registered with its Poll; `main`: the main thread's.
    pub fn new(dhcp: Option<Server>, lease_file: Option<PathBuf>, wakers: Vec<Waker>, main: Waker) -> Shared {
        let epoch = dhcp.as_ref().map_or(0, Server::epoch);
        let n = wakers.len();
        Shared {
            state: Mutex::new(State { dhcp, ..Default::default() }),
            epoch: AtomicU64::new(epoch),
            next_id: AtomicU64::new(1),
            lease_file,
            saving: Mutex::new(()),
            mailboxes: wakers.into_iter().map(|waker| Mailbox { waker, inbox: Mutex::new(Vec::new()) }).collect(),
            reports: (0..n).map(|_| Mutex::new(Report::default())).collect(),
            main,
            started: Instant::now(),
            #[cfg(test)]
            locks: AtomicU64::new(0),
        }
    }

    pub fn workers(&self) -> usize {
        self.mailboxes.len()
    }

    /// Take the lock (a worker that panicked while holding it left the state consistent
    /// enough: every change under it is a few map updates).
    pub fn lock(&self) -> Locked<'_> {
        #[cfg(test)]
        self.locks.fetch_add(1, Ordering::Relaxed);
        Locked { guard: self.state.lock().unwrap_or_else(|e| e.into_inner()), epoch: &self.epoch }
    }

    /// The DHCP engine's epoch, without the lock (per frame).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A new connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1
    }

    /// Queue `cmd` for worker `w` and wake it.
    pub fn send(&self, w: usize, cmd: Command) {
        let m = &self.mailboxes[w];
        m.inbox.lock().unwrap_or_else(|e| e.into_inner()).push(cmd);
        if let Err(e) = m.waker.wake() {
            log::error!("waking worker {w}: {e}");
        }
    }

    /// Worker `w`'s queued commands.
    pub fn take_commands(&self, w: usize) -> Vec<Command> {
        std::mem::take(&mut *self.mailboxes[w].inbox.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Wake the main thread (a worker stopped).
    pub fn wake_main(&self) {
        let _ = self.main.wake();
    }

    /// Worker `w`'s report for the others' status pages.
    pub fn publish(&self, w: usize, r: Report) {
        *self.reports[w].lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    /// Every worker's last report except `w`'s, merged.
    pub fn others(&self, w: usize) -> Report {
        let mut all = Report::default();
        for (_, r) in self.reports.iter().enumerate().filter(|(i, _)| *i != w) {
            all.merge(&r.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }

    /// Is there a lease file to keep?
    pub fn keeps_leases(&self) -> bool {
        self.lease_file.is_some()
    }

    /// Rewrite the lease file if the leases changed. The leases are copied under the lock and
    /// written outside it, one writer at a time, so the newest copy is always written last.
    /// Called by the lease writer ([`super::workers`]), never by an event loop: it fsyncs.
    pub fn save_leases(&self) {
        let Some(path) = &self.lease_file else { return };
        let _one_writer = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let leases: Vec<Lease> = {
            let mut st = self.lock();
            let Some(d) = &mut st.dhcp else { return };
            if !d.take_dirty() {
                return;
            }
            d.leases().cloned().collect()
        };
        let (engine, wall) = (super::policy::unix_now(), super::policy::wall_now());
        let leases: Vec<Lease> = leases
            .into_iter()
            .map(|l| Lease { expires: super::policy::to_wall(l.expires, engine, wall), ..l })
            .collect();
        if let Err(e) = store::save(path, leases.iter()) {
            log::error!("writing the lease file {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake::{parse_request, Outcome};

    fn upgrade() -> Upgrade {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        match parse_request(req) {
            Outcome::Upgrade(u) => u,
            _ => panic!("not an upgrade"),
        }
    }

    #[test]
    fn admission_counts_are_global_and_released() {
        let adm = Admission { max_clients: 3, max_per_ip: 2, ..Default::default() };
        let (a, b): (IpAddr, IpAddr) = ("203.0.113.1".parse().unwrap(), "203.0.113.2".parse().unwrap());
        let mut st = State::default();
        let up = upgrade();
        assert!(st.admit(&adm, &up, a).is_ok() && st.admit(&adm, &up, a).is_ok());
        assert_eq!(st.admit(&adm, &up, a).unwrap_err().0, Refused::PerIpLimit);
        assert!(st.admit(&adm, &up, b).is_ok());
        assert_eq!(st.admit(&adm, &up, b).unwrap_err().0, Refused::ServerFull);
        st.release(a);
        assert!(st.per_ip.get(&a) == Some(&1) && st.admit(&adm, &up, b).is_ok());
        for ip in [a, b, b] {
            st.release(ip);
        }
        assert_eq!((st.clients, st.per_ip.len()), (0, 0), "nothing left behind");
    }

    /// A host with an IPv6 /64 can use a new address for every connection: the per-address
    /// limit counts the /64.
    #[test]
    fn an_ipv6_64_is_one_address_for_the_limit() {
        let adm = Admission { max_clients: 10, max_per_ip: 2, ..Default::default() };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut st = State::default();
        let up = upgrade();
        assert!(st.admit(&adm, &up, ip("2001:db8:0:1::a")).is_ok());
        assert!(st.admit(&adm, &up, ip("2001:db8:0:1::b")).is_ok());
        assert_eq!(st.admit(&adm, &up, ip("2001:db8:0:1:ffff::c")).unwrap_err().0, Refused::PerIpLimit);
        assert!(st.admit(&adm, &up, ip("2001:db8:0:2::a")).is_ok(), "another /64");
        st.release(ip("2001:db8:0:1::b"));
        assert!(st.admit(&adm, &up, ip("2001:db8:0:1::d")).is_ok());
    }

    #[test]
    fn reports_merge() {
        let mut r = Report { refused: [1, 0, 0, 2, 0, 0], ..Default::default() };
        r.totals.to_tap_frames = 5;
        let o = Report {
            clients: vec![ClientRow::default()],
            refused: [0, 0, 0, 1, 0, 0],
            drops: [0, 0, 3, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        r.merge(&o);
        assert_eq!((r.clients.len(), r.refused, r.drops[2], r.totals.to_tap_frames), (1, [1, 0, 0, 3, 0, 0], 3, 5));
    }
}
