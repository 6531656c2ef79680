//! The DHCPv4 lease state machine (RFC 2131 §4.3), sans-io: decoded messages, connection
//! closes and the time (unix seconds) in; replies with their destination out. No sockets, no
//! clock, no file: the caller feeds it, sends what it returns and saves [`Server::leases`] when
//! [`Server::take_dirty`] says so.
//!
//! # Who owns an address
//!
//! A client is known by its *key*: the client identifier (61) if it sent one, else `htype`
//! followed by `chaddr` — the form RFC 2132 §9.14 recommends for client identifiers, so a client
//! that sends `01:<mac>` as its identifier only some of the time is still one client. An
//! identifier that does not end with `chaddr` gets it appended, so every key ends with its
//! client's MAC and no client can name another's lease ([`key_of`]).
//!
//! Every record (an outstanding offer or a lease) belongs to at most one WebSocket connection,
//! and a connection has at most one record: when a connection asks with a new key, the record it
//! holds under its old key is freed first, so a guest inventing MAC addresses never holds more
//! than one address. A key is one machine: when a key asks from another connection, its record moves
//! there (this is how a reconnecting browser VM keeps its address).
//!
//! An address is *pinned* — never given to anyone else — while its lease is bound to a live
//! connection and unexpired, and while it is reserved for a MAC. Everything else is a courtesy
//! that gives way when the pool runs out: an outstanding offer (`offer_timeout`), the grace
//! period after a connection closed (`grace`), the memory of an expired lease (so a returning
//! client gets its old address), and last the quarantine of an address a client declined (one
//! per connection, of the lease acknowledged on it). A new client gets, in order: a never-used
//! address, else the one whose courtesy ended longest ago or ends soonest, else the one whose
//! quarantine ends soonest — except that with [`MAX_RECORDS`] records it first takes the one of
//! those no live connection holds (a grace, a remembered lease) rather than add a record, and
//! never an address its connection declined. The pool is exhausted only when every address is
//! pinned; that is logged once per episode.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use super::wire::{self, opt, DhcpOption, Message, MessageType};
use crate::config::Ipv4Net;
use crate::sys::format_mac;

/// One per WebSocket connection; never reused while the server runs.
pub type ConnId = u64;

/// Longest client identifier accepted (a longer one is ignored, so keys stay small).
const MAX_CLIENT_ID: usize = 255;
/// Host names are stored up to this many bytes.
const MAX_HOST_NAME: usize = 255;
/// Records (leases and offers) kept before a new client is given a remembered address rather
/// than a never-used one: in a large subnet, connections cycling with new keys would otherwise
/// leave a lease each, in memory and in the lease file, up to the size of the pool.
const MAX_RECORDS: usize = 4096;
/// Addresses a connection declined that it is not offered again (the oldest is forgotten).
const MAX_DECLINED: usize = 8;

/// The server's settings. See [`Server::new`] for what is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The bridge's address: server identifier (54).
    pub server_ip: Ipv4Addr,
    /// The pool is every host address of it except `server_ip`, `router` and reserved ones.
    pub subnet: Ipv4Net,
    /// Option 3.
    pub router: Ipv4Addr,
    /// Option 6 (omitted when empty).
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 26.
    pub mtu: Option<u16>,
    /// Seconds; T1 (58) is half of it, T2 (59) seven eighths.
    pub lease_time: u32,
    /// Narrows the dynamic pool to these addresses (inclusive).
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// MAC → fixed address, never given to another client.
    pub reservations: Vec<([u8; 6], Ipv4Addr)>,
    /// Seconds a closed connection's lease is kept for a reconnect with the same key.
    pub grace: u32,
    /// Seconds a DECLINEd address stays out of the pool.
    pub quarantine: u32,
    /// Seconds an OFFER reserves its address.
    pub offer_timeout: u32,
}

/// A lease (or, inside the server, an outstanding offer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// The client's hardware address (chaddr; with anti-spoofing, the connection's MAC too). Every
    /// key ends with it.
    pub mac: [u8; 6],
    /// The lease key ([`key_of`]: the client identifier (61), or `htype` + `chaddr`, ending
    /// with `mac`); never empty.
    pub client_key: Vec<u8>,
    /// Host name (12) as sent, up to 255 bytes; empty when none was given.
    pub hostname: Vec<u8>,
    /// Unix seconds at which the lease ends.
    pub expires: u64,
    /// The live connection holding it; `None` after the connection closed (or after a restart).
    pub conn: Option<ConnId>,
}

/// A reply and where it goes (RFC 2131 §4.1; `giaddr` is always 0 here): from
/// `server_ip`:67 to `dst_ip`:68, in an Ethernet frame to `dst_mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub msg: Message,
    pub dst_ip: Ipv4Addr,
    pub dst_mac: [u8; 6],
}

#[derive(Debug, Clone)]
struct Record {
    lease: Lease,
    /// ACKed at least once (else only offered: not listed, not saved).
    bound: bool,
    /// An OFFER holds the address until then (0: none).
    offer_until: u64,
    /// With no connection: the grace period holds the address until then.
    grace_until: u64,
}

impl Record {
    /// Never given to another client.
    fn pinned(&self, now: u64) -> bool {
        self.bound && self.lease.conn.is_some() && self.lease.expires >= now
    }

    /// Until when courtesy keeps the address (offer, grace, or the lease of a live connection).
    /// Records are reclaimed in order of this time; it is in the past for a free one.
    fn held_until(&self) -> u64 {
        let own = match self.lease.conn {
            None => self.grace_until,
            Some(_) if self.bound => self.lease.expires,
            Some(_) => 0,
        };
        own.max(self.offer_until)
    }

    fn is_free(&self, now: u64) -> bool {
        self.held_until() < now
    }
}

/// The lease key of `msg` (see [`key_of`]): its client identifier, else htype followed by the
/// MAC. `None` for an identifier over [`MAX_CLIENT_ID`] bytes.
fn client_key(msg: &Message, chaddr: [u8; 6]) -> Option<Vec<u8>> {
    match msg.client_id() {
        Some(id) if id.len() > MAX_CLIENT_ID => None,
        Some(id) if !id.is_empty() => Some(key_of(id, chaddr)),
        _ => Some(key_of(&[msg.htype], chaddr)),
    }
}

/// The key for identifier `id` from `mac`, the identifier with the MAC appended unless it ends
/// with it already (as `01:<mac>` does, and `htype` alone does not): every key ends with the
/// client's MAC, so clients with different MACs never share one whatever identifier they send.
/// (One client cannot name another's lease to take, release or decline it; guests cloned from
/// one disk image, whose DUID-based identifiers are equal, do not fight over one address.) Also
/// brings keys of lease files from before this rule up to it.
pub fn key_of(id: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut k = id.to_vec();
    if !k.ends_with(&mac) {
        k.extend_from_slice(&mac);
    }
    k
}

/// The DHCP server state. See the module documentation.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    /// Dynamic pool: `lo..=hi` minus `server_ip`, `router`, the DNS servers and the reserved
    /// addresses.
    lo: u32,
    hi: u32,
    pool_size: usize,
    reservations: HashMap<[u8; 6], u32>,
    reserved_ips: HashSet<u32>,
    /// Every record by address; at most one per address. More than `max_records` only while
    /// that many are pinned (live connections, so a few thousand at most).
    records: BTreeMap<u32, Record>,
    max_records: usize,
    by_key: HashMap<Vec<u8>, u32>,
    by_conn: HashMap<ConnId, u32>,
    /// Address → end of its quarantine.
    quarantine: BTreeMap<u32, u64>,
    /// Addresses each connection declined (the first is quarantined), the last
    /// [`MAX_DECLINED`]: not offered to it again.
    declined: HashMap<ConnId, Vec<u32>>,
    /// DECLINEs are logged at most once a minute: not before this time, with how many were not.
    decline_log: (u64, u64),
    /// Earliest offer or quarantine end: `expire` has nothing to do before it.
    next_deadline: u64,
    /// Earliest end of a live connection's lease: `expire` moves the epoch when it passes.
    next_lease_end: u64,
    dirty: bool,
    /// Bumped by every change that may change an answer of [`Server::bound_ip`] or
    /// [`Server::held_by_other`] at a given time (see [`Server::epoch`]).
    epoch: u64,
    /// The current exhaustion episode has been logged.
    exhausted: bool,
    exhaustion_warnings: u64,
}

impl Server {
    /// Checks `cfg`: the server address is a host of the subnet; the range is inside the subnet
    /// and not reversed; reservations are host addresses of the subnet, not the server or router,
    /// and unique; lease time and MTU are sane; the pool is not empty.
    pub fn new(cfg: ServerConfig) -> Result<Server, String> {
        let net = cfg.subnet;
        let (first, last) = (u32::from(net.network()).saturating_add(1), u32::from(net.broadcast()).saturating_sub(1));
        let is_host = |ip: Ipv4Addr| net.contains(ip) && (first..=last).contains(&u32::from(ip));
        if !is_host(cfg.server_ip) {
            return Err(format!("DHCP server address {} is not a host address of {net}", cfg.server_ip));
        }
        if cfg.lease_time == 0 {
            return Err("DHCP lease time must be at least 1 second".into());
        }
        if let Some(mtu) = cfg.mtu.filter(|m| *m < 68) {
            return Err(format!("DHCP MTU {mtu} is below the IPv4 minimum of 68"));
        }
        let (mut lo, mut hi) = (first, last);
        if let Some((a, b)) = cfg.range {
            if !net.contains(a) || !net.contains(b) {
                return Err(format!("DHCP range {a}-{b} is not inside {net}"));
            }
            if a > b {
                return Err(format!("DHCP range {a}-{b} is reversed"));
            }
            lo = lo.max(a.into());
            hi = hi.min(b.into());
        }
        let mut reservations = HashMap::new();
        let mut reserved_ips = HashSet::new();
        for (mac, ip) in &cfg.reservations {
            if !is_host(*ip) || *ip == cfg.server_ip || *ip == cfg.router || cfg.dns.contains(ip) {
                return Err(format!(
                    "DHCP reservation {} → {ip}: not a free host address of {net} (server {}, router {})",
                    format_mac(mac),
                    cfg.server_ip,
                    cfg.router
                ));
            }
            if reservations.insert(*mac, u32::from(*ip)).is_some() || !reserved_ips.insert(u32::from(*ip)) {
                return Err(format!("DHCP reservation {} → {ip}: MAC or address reserved twice", format_mac(mac)));
            }
        }
        let mut server = Server {
            lo,
            hi,
            pool_size: 0,
            reservations,
            reserved_ips,
            records: BTreeMap::new(),
            max_records: MAX_RECORDS,
            by_key: HashMap::new(),
            by_conn: HashMap::new(),
            quarantine: BTreeMap::new(),
            declined: HashMap::new(),
            decline_log: (0, 0),
            next_deadline: u64::MAX,
            next_lease_end: u64::MAX,
            dirty: false,
            epoch: 0,
            exhausted: false,
            exhaustion_warnings: 0,
            cfg,
        };
        if lo <= hi {
            let excluded = [u32::from(server.cfg.server_ip), u32::from(server.cfg.router)]
                .into_iter()
                .chain(server.reserved_ips.iter().copied())
                .chain(server.cfg.dns.iter().map(|d| u32::from(*d)))
                .collect::<HashSet<u32>>();
            let excluded = excluded.iter().filter(|ip| (lo..=hi).contains(*ip)).count();
            server.pool_size = (hi - lo) as usize + 1 - excluded;
        }
        if server.pool_size == 0 {
            return Err(format!("DHCP pool is empty: no address of {net} is left for clients"));
        }
        Ok(server)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Addresses of the dynamic pool (reservations not included).
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// Addresses of the dynamic pool that nobody holds: not pinned, not quarantined, not held by
    /// an offer or a grace period. O(records).
    pub fn free_count(&self, now: u64) -> usize {
        let held = self.records.iter().filter(|(ip, r)| self.in_pool(**ip) && !r.is_free(now)).count();
        let quarantined = self.quarantine.keys().filter(|ip| self.in_pool(**ip)).count();
        self.pool_size - held - quarantined
    }

    /// Bound leases (current, in grace, or expired but remembered), by address. Outstanding
    /// offers are not listed.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.records.values().filter(|r| r.bound).map(|r| &r.lease)
    }

    /// Moves whenever a bound lease is made, renewed after it ran out, moved to another
    /// connection, let go by its connection or removed: the only changes that can alter what [`Server::bound_ip`] and
    /// [`Server::held_by_other`] answer for a given time. Callers that cache their answers
    /// (one per connection, on every frame) ask again when it moves; offers, NAKs, INFORMs
    /// and ignored messages leave it alone. A live connection's lease that runs out moves it
    /// too, at the next [`Server::expire`] (called once a second).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The address bound to connection `conn` (an acknowledged, unexpired lease), if any.
    pub fn bound_ip(&self, conn: ConnId, now: u64) -> Option<Ipv4Addr> {
        let ip = *self.by_conn.get(&conn)?;
        let r = self.records.get(&ip)?;
        (r.bound && r.lease.conn == Some(conn) && r.lease.expires >= now).then(|| Ipv4Addr::from(ip))
    }

    /// The live connection, other than `conn`, that holds the lease `msg`'s client asks
    /// about (by client identifier or MAC). The relay refuses such a message unless it is the
    /// same client reconnecting: otherwise one client could name another's key and take its
    /// address, or release it.
    pub fn key_held_elsewhere(&self, conn: ConnId, msg: &Message) -> Option<ConnId> {
        let chaddr = msg.client_mac()?;
        let key = client_key(msg, chaddr)?;
        let ip = self.by_key.get(&key)?;
        self.records.get(ip)?.lease.conn.filter(|&c| c != conn)
    }

    /// Is `ip` bound to a live connection other than `conn` (or reserved for another MAC)?
    pub fn held_by_other(&self, ip: Ipv4Addr, conn: ConnId, now: u64) -> bool {
        let ip = u32::from(ip);
        self.records.get(&ip).is_some_and(|r| r.pinned(now) && r.lease.conn != Some(conn))
    }

    /// Is `ip` one no client (here with MAC `mac`) may use as its own without a lease saying so:
    /// the server's, the router's, an on-subnet DNS server's, the subnet's network or broadcast
    /// address, or one reserved for another MAC? Fixed by the configuration, so an answer never
    /// goes stale.
    pub fn off_limits(&self, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> bool {
        let net = self.cfg.subnet;
        let edge = net.prefix <= 30 && (ip == net.network() || ip == net.broadcast());
        let reserved = self.reserved_ips.contains(&u32::from(ip))
            && mac.is_none_or(|m| self.reservations.get(&m) != Some(&u32::from(ip)));
        ip == self.cfg.server_ip
            || ip == self.cfg.router
            || edge
            || reserved
            || (net.contains(ip) && self.cfg.dns.contains(&ip))
    }

    /// Connection `conn`, which holds nothing, uses `ip` as its source, from `mac`: if `ip` is
    /// a bound, unexpired lease of that MAC that no live connection holds, the connection takes
    /// it up, as a DHCP exchange would. A browser VM that reconnects, or whose relay restarted
    /// (the lease file), sends no new exchange: its guest keeps using its address, which would
    /// otherwise be free for others once the grace period is over. Returns whether it did.
    pub fn adopt(&mut self, conn: ConnId, mac: [u8; 6], ip: Ipv4Addr, now: u64) -> bool {
        if self.by_conn.contains_key(&conn) {
            return false;
        }
        let at = u32::from(ip);
        let Some(r) = self.records.get_mut(&at) else { return false };
        if !r.bound || r.lease.conn.is_some() || r.lease.expires < now || r.lease.mac != mac {
            return false;
        }
        r.lease.conn = Some(conn);
        r.grace_until = 0;
        r.offer_until = 0;
        self.by_conn.insert(conn, at);
        self.epoch += 1;
        self.next_lease_end = self.next_lease_end.min(r.lease.expires);
        true
    }

    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Leases from the lease file, before any message is handled. They have no connection:
    /// unexpired ones enter the grace period from `now`, expired ones are remembered (free, but
    /// their client gets them back if nobody took them). Leases whose address is no longer
    /// allowed (configuration changed) or is claimed twice are dropped with a warning.
    pub fn load(&mut self, mut leases: Vec<Lease>, now: u64) {
        self.epoch += 1;
        if leases.len() > self.max_records {
            log::warn!("DHCP lease file: {} leases, keeping the {} that end last", leases.len(), self.max_records);
            leases.sort_by_key(|l| std::cmp::Reverse(l.expires));
            leases.truncate(self.max_records);
            self.dirty = true;
        }
        for mut lease in leases {
            let ip = u32::from(lease.ip);
            if !lease.client_key.is_empty() {
                lease.client_key = key_of(&lease.client_key, lease.mac);
            }
            let allowed = self.allowed(ip, Some(lease.mac)) && !self.quarantine.contains_key(&ip);
            if !allowed || lease.client_key.is_empty() || self.records.contains_key(&ip) {
                log::warn!("DHCP lease file: dropping the lease of {} (not in the pool, or taken twice)", lease.ip);
                self.dirty = true;
                continue;
            }
            if self.by_key.contains_key(&lease.client_key) {
                log::warn!("DHCP lease file: dropping the lease of {} (its client has another one)", lease.ip);
                self.dirty = true;
                continue;
            }
            lease.conn = None;
            lease.hostname.truncate(MAX_HOST_NAME);
            let grace_until = if lease.expires >= now { now + u64::from(self.cfg.grace) } else { 0 };
            self.by_key.insert(lease.client_key.clone(), ip);
            self.records.insert(ip, Record { lease, bound: true, offer_until: 0, grace_until });
        }
    }

    /// The connection closed: its lease enters the grace period, its offer is dropped.
    pub fn connection_closed(&mut self, conn: ConnId, now: u64) {
        self.declined.remove(&conn);
        let Some(ip) = self.by_conn.remove(&conn) else { return };
        let r = self.records.get_mut(&ip).expect("by_conn points at a record");
        if r.bound {
            self.epoch += 1;
            r.lease.conn = None;
            r.offer_until = 0;
            r.grace_until = now + u64::from(self.cfg.grace);
        } else {
            self.remove(ip);
        }
    }

    /// Ends offers and quarantines that are over. Cheap when nothing is due; call about once a
    /// second. (Leases, graces and expired leases need no sweep: they are judged when an address
    /// is needed.)
    pub fn expire(&mut self, now: u64) {
        if now > self.next_lease_end {
            // A live connection's lease ran out: cached answers about it are stale.
            self.epoch += 1;
            self.next_lease_end =
                self.records.values().filter(|r| r.pinned(now)).map(|r| r.lease.expires).min().unwrap_or(u64::MAX);
        }
        if now <= self.next_deadline {
            return;
        }
        self.quarantine.retain(|_, until| *until >= now);
        let over: Vec<u32> =
            self.records.iter().filter(|(_, r)| !r.bound && r.offer_until < now).map(|(ip, _)| *ip).collect();
        for ip in over {
            self.remove(ip);
        }
        for r in self.records.values_mut() {
            if r.offer_until < now {
                r.offer_until = 0;
            }
        }
        self.next_deadline = self
            .quarantine
            .values()
            .copied()
            .chain(self.records.values().filter(|r| r.offer_until != 0).map(|r| r.offer_until))
            .min()
            .unwrap_or(u64::MAX);
    }

    /// A DHCP message that arrived on connection `conn`, in an Ethernet frame from `src_mac`;
    /// `broadcast`: its IPv4 destination was 255.255.255.255 (else the server's address). RENEWING
    /// (unicast) and REBINDING (broadcast) requests are answered alike; `broadcast` only shows in
    /// the debug log.
    ///
    /// Messages that are not BOOTREQUESTs from Ethernet clients (htype 1, hlen 6) are ignored.
    pub fn handle(
        &mut self,
        conn: ConnId,
        src_mac: [u8; 6],
        broadcast: bool,
        msg: &Message,
        now: u64,
    ) -> Option<Reply> {
        if msg.op != wire::BOOTREQUEST {
            return None;
        }
        let chaddr = msg.client_mac()?;
        let key = client_key(msg, chaddr)?;
        let ty = msg.message_type()?;
        let ours = msg.server_id().is_none_or(|s| s == self.cfg.server_ip);
        log::debug!(
            "DHCP {ty:?} from {} ({}) on connection {conn}, to {}",
            format_mac(&chaddr),
            format_mac(&src_mac),
            if broadcast { "broadcast" } else { "server" }
        );
        let c = Client { conn, chaddr, key: &key };
        // A connection asking under a new key gives up what it holds under its old one.
        let prev = match ty {
            MessageType::Discover | MessageType::Request => self.detach_other(&c),
            _ => None,
        };
        match ty {
            MessageType::Discover => self.discover(&c, msg, prev, now),
            MessageType::Request => self.request(&c, msg, now),
            MessageType::Decline if ours => {
                self.decline(&c, msg, now);
                None
            }
            MessageType::Release if ours => {
                self.release(&c, msg);
                None
            }
            MessageType::Inform => self.inform(msg),
            _ => None,
        }
    }

    // ---- message paths ----

    fn discover(&mut self, c: &Client, msg: &Message, prev: Option<u32>, now: u64) -> Option<Reply> {
        let ip = self.pick(c, msg.requested_ip(), prev, now)?;
        let until = now + u64::from(self.cfg.offer_timeout);
        let r = self.claim(ip, c, msg);
        r.offer_until = until;
        self.next_deadline = self.next_deadline.min(until);
        Some(self.lease_reply(MessageType::Offer, msg, ip))
    }

    fn request(&mut self, c: &Client, msg: &Message, now: u64) -> Option<Reply> {
        let own = self.by_key.get(c.key).copied();
        if let Some(sid) = msg.server_id() {
            // SELECTING.
            if sid != self.cfg.server_ip {
                // The client took another server's offer.
                if let Some(ip) = own {
                    if self.records[&ip].bound {
                        self.records.get_mut(&ip).expect("own").offer_until = 0;
                    } else {
                        self.remove(ip);
                    }
                }
                return None;
            }
            let want = msg.requested_ip().or(nonzero(msg.ciaddr))?;
            return match own {
                Some(ip) if u32::from(want) == ip && self.may_keep(ip, c) => self.ack(ip, c, msg, now),
                _ => Some(self.nak(msg, "the offered address is no longer available")),
            };
        }
        let (want, init_reboot) = match (msg.requested_ip(), nonzero(msg.ciaddr)) {
            (Some(r), None) => (r, true),
            (r, Some(ci)) => (r.unwrap_or(ci), false),
            (None, None) => return None,
        };
        if init_reboot && !self.cfg.subnet.contains(want) {
            return Some(self.nak(msg, "wrong network"));
        }
        match own {
            Some(ip) if u32::from(want) == ip && self.may_keep(ip, c) => self.ack(ip, c, msg, now),
            Some(_) => Some(self.nak(msg, "that address is not yours")),
            // No record of this client. RFC 2131 §4.3.2 has a server that may not be the only one
            // stay silent; wsnic is the only server its clients can reach (their DHCP never
            // reaches the bridge), so it answers with authority: silence would let a client
            // keep using an address it no longer holds (one reclaimed, reserved, quarantined, or
            // another's) until its lease runs out. After the NAK it DISCOVERs, usually asking
            // for the same address, which it gets if it is free.
            None => Some(self.nak(msg, "no lease of this client")),
        }
    }

    /// A client declines the address it was given (it found it in use, RFC 2131 §3.1.5): the
    /// address is quarantined. Only the lease acknowledged on this connection counts, and only
    /// once per connection: else one client could quarantine the pool address by address with
    /// offers and DECLINEs. A second DECLINE frees the address without a quarantine. (And a
    /// quarantined address is still the last resort of [`Server::pick`].)
    fn decline(&mut self, c: &Client, msg: &Message, now: u64) {
        let Some(&ip) = self.by_key.get(c.key) else { return };
        let r = &self.records[&ip];
        if !r.bound || r.lease.conn != Some(c.conn) || msg.requested_ip().is_some_and(|q| u32::from(q) != ip) {
            return;
        }
        self.remove(ip);
        let list = self.declined.entry(c.conn).or_default();
        list.push(ip);
        if list.len() > MAX_DECLINED {
            list.remove(0);
        }
        if list.len() > 1 {
            return; // one quarantine per connection
        }
        let (next, unlogged) = &mut self.decline_log;
        if now >= *next {
            let more = match std::mem::take(unlogged) {
                0 => String::new(),
                n => format!(" ({n} more DECLINEs in the last minute not logged)"),
            };
            log::warn!(
                "DHCP: {} declined {} (in use by someone else?); quarantined{more}",
                format_mac(&c.chaddr),
                Ipv4Addr::from(ip)
            );
            *next = now + 60;
        } else {
            *unlogged += 1;
        }
        let until = now + u64::from(self.cfg.quarantine);
        self.quarantine.insert(ip, until);
        self.next_deadline = self.next_deadline.min(until);
    }

    fn release(&mut self, c: &Client, msg: &Message) {
        if let Some(&ip) = self.by_key.get(c.key) {
            if u32::from(msg.ciaddr) == ip {
                self.remove(ip);
            }
        }
    }

    fn inform(&self, msg: &Message) -> Option<Reply> {
        let ciaddr = nonzero(msg.ciaddr)?;
        let mut reply = self.reply_base(MessageType::Ack, msg);
        reply.options = self.fit(msg, MessageType::Ack, false);
        let dst_mac = msg.client_mac()?;
        Some(Reply { msg: reply, dst_ip: ciaddr, dst_mac })
    }

    fn ack(&mut self, ip: u32, c: &Client, msg: &Message, now: u64) -> Option<Reply> {
        let expires = now + u64::from(self.cfg.lease_time);
        // A renewal on the same connection of a lease still running changes no answer (a move
        // to another connection moves the epoch in `claim`).
        let renewal = self.records.get(&ip).is_some_and(|r| r.bound && r.lease.expires >= now);
        let r = self.claim(ip, c, msg);
        r.bound = true;
        r.offer_until = 0;
        r.lease.expires = expires;
        self.dirty = true;
        if !renewal {
            self.epoch += 1;
        }
        self.next_lease_end = self.next_lease_end.min(expires);
        Some(self.lease_reply(MessageType::Ack, msg, ip))
    }

    // ---- bookkeeping ----

    fn in_pool(&self, ip: u32) -> bool {
        (self.lo..=self.hi).contains(&ip)
            && ip != u32::from(self.cfg.server_ip)
            && ip != u32::from(self.cfg.router)
            && !self.reserved_ips.contains(&ip)
            && !self.cfg.dns.contains(&Ipv4Addr::from(ip))
    }

    /// May a client with this MAC hold `ip`?
    fn allowed(&self, ip: u32, mac: Option<[u8; 6]>) -> bool {
        self.in_pool(ip) || mac.is_some_and(|m| self.reservations.get(&m) == Some(&ip))
    }

    /// May the client keep its record at `ip`? (Not when its MAC has a reservation elsewhere, or
    /// the address is no longer allowed for it.)
    fn may_keep(&self, ip: u32, c: &Client) -> bool {
        match self.reservations.get(&c.chaddr) {
            Some(&r) if r != ip && !self.quarantine.contains_key(&r) => false,
            _ => self.allowed(ip, Some(c.chaddr)),
        }
    }

    /// Frees the record that `c.conn` holds under another key; returns its address.
    fn detach_other(&mut self, c: &Client) -> Option<u32> {
        let ip = *self.by_conn.get(&c.conn)?;
        if self.records[&ip].lease.client_key == c.key {
            return None;
        }
        self.remove(ip);
        Some(ip)
    }

    /// Removes the record at `ip` and everything pointing at it.
    fn remove(&mut self, ip: u32) -> Option<Record> {
        let r = self.records.remove(&ip)?;
        self.epoch += u64::from(r.bound);
        self.by_key.remove(&r.lease.client_key);
        if let Some(conn) = r.lease.conn {
            if self.by_conn.get(&conn) == Some(&ip) {
                self.by_conn.remove(&conn);
            }
        }
        self.dirty |= r.bound;
        Some(r)
    }

    /// Can a new client take `ip` without displacing anyone who still holds it?
    fn available(&self, ip: u32, now: u64) -> bool {
        self.in_pool(ip) && !self.quarantine.contains_key(&ip) && self.records.get(&ip).is_none_or(|r| r.is_free(now))
    }

    /// The address to offer, or `None` (pool exhausted: warned once per episode).
    fn pick(&mut self, c: &Client, requested: Option<Ipv4Addr>, prev: Option<u32>, now: u64) -> Option<u32> {
        if let Some(&r) = self.reservations.get(&c.chaddr) {
            if !self.quarantine.contains_key(&r) {
                return Some(r);
            }
        }
        if let Some(&ip) = self.by_key.get(c.key) {
            if self.may_keep(ip, c) {
                return Some(ip);
            }
        }
        // With `max_records` records, one no live connection holds is reused rather than a record
        // added (a live connection's outstanding offer gives way only when nothing else is left).
        // Addresses this connection declined are not offered to it again.
        let roomy = self.records.len() < self.max_records;
        let avoid = self.declined.get(&c.conn).map_or(&[][..], |v| &v[..]);
        let fits =
            |s: &Self, ip: u32| s.available(ip, now) && (roomy || s.records.contains_key(&ip)) && !avoid.contains(&ip);
        let fresh = requested
            .map(u32::from)
            .filter(|ip| fits(self, *ip))
            .or(prev.filter(|ip| fits(self, *ip)))
            .or_else(|| roomy.then(|| self.lowest_unused(avoid)).flatten())
            .or_else(|| self.oldest_reclaimable(now, true, avoid))
            .or_else(|| self.lowest_unused(avoid))
            .or_else(|| self.oldest_reclaimable(now, false, avoid));
        let fresh = fresh.or_else(|| self.end_soonest_quarantine());
        match fresh {
            Some(ip) => {
                self.exhausted = false;
                Some(ip)
            }
            None => {
                if !self.exhausted {
                    self.exhausted = true;
                    self.exhaustion_warnings += 1;
                    log::warn!("DHCP pool exhausted: {} addresses, all held by connected clients", self.pool_size);
                }
                None
            }
        }
    }

    /// The last resort: the pool address whose quarantine ends soonest, released from it.
    fn end_soonest_quarantine(&mut self) -> Option<u32> {
        let ip = self.quarantine.iter().filter(|(ip, _)| self.in_pool(**ip)).min_by_key(|(ip, u)| (**u, **ip))?.0;
        let ip = *ip;
        self.quarantine.remove(&ip);
        Some(ip)
    }

    /// The lowest pool address with no record and no quarantine, not in `avoid`.
    fn lowest_unused(&self, avoid: &[u32]) -> Option<u32> {
        let mut used = self.records.range(self.lo..=self.hi).map(|(ip, _)| *ip).peekable();
        let mut ip = self.lo;
        loop {
            if ip > self.hi {
                return None;
            }
            while used.next_if(|u| *u < ip).is_some() {}
            if used.peek() == Some(&ip) || !self.in_pool(ip) || self.quarantine.contains_key(&ip) || avoid.contains(&ip)
            {
                ip = ip.checked_add(1)?;
                continue;
            }
            return Some(ip);
        }
    }

    /// The pool address whose courtesy hold ended longest ago or ends soonest (`idle_only`: of
    /// those no live connection holds, not an outstanding offer), not in `avoid`.
    fn oldest_reclaimable(&self, now: u64, idle_only: bool, avoid: &[u32]) -> Option<u32> {
        self.records
            .range(self.lo..=self.hi)
            .filter(|(ip, r)| !r.pinned(now) && self.in_pool(**ip) && !avoid.contains(*ip))
            .filter(|(_, r)| !idle_only || r.lease.conn.is_none())
            .min_by_key(|(ip, r)| (r.held_until(), **ip))
            .map(|(ip, _)| *ip)
    }

    /// Makes the record at `ip` the client's (creating it, or replacing another client's, or
    /// moving the client's own from elsewhere) and attaches it to `c.conn`.
    fn claim(&mut self, ip: u32, c: &Client, msg: &Message) -> &mut Record {
        if let Some(&old) = self.by_key.get(c.key) {
            if old != ip {
                self.remove(old);
            }
        }
        if self.records.get(&ip).is_some_and(|r| r.lease.client_key != c.key) {
            self.remove(ip);
        }
        if let Some(prev_ip) = self.by_conn.insert(c.conn, ip) {
            debug_assert_eq!(prev_ip, ip, "detach_other ran first");
        }
        let hostname = msg.host_name().map(|h| h[..h.len().min(MAX_HOST_NAME)].to_vec());
        let key = c.key;
        let by_conn = &mut self.by_conn;
        let by_key = &mut self.by_key;
        let r = self.records.entry(ip).or_insert_with(|| {
            by_key.insert(key.to_vec(), ip);
            Record {
                lease: Lease {
                    ip: ip.into(),
                    mac: c.chaddr,
                    client_key: key.to_vec(),
                    hostname: Vec::new(),
                    expires: 0,
                    conn: None,
                },
                bound: false,
                offer_until: 0,
                grace_until: 0,
            }
        });
        if let Some(old) = r.lease.conn.filter(|old| *old != c.conn) {
            // The key moved here from another connection.
            if by_conn.get(&old) == Some(&ip) {
                by_conn.remove(&old);
            }
        }
        if r.bound && r.lease.conn != Some(c.conn) {
            // A bound lease changes connection, or is taken back from its grace.
            self.epoch += 1;
            self.next_lease_end = self.next_lease_end.min(r.lease.expires);
        }
        r.lease.conn = Some(c.conn);
        r.grace_until = 0;
        if r.lease.mac != c.chaddr {
            r.lease.mac = c.chaddr;
            self.dirty |= r.bound;
        }
        if let Some(h) = hostname.filter(|h| *h != r.lease.hostname) {
            r.lease.hostname = h;
            self.dirty |= r.bound;
        }
        r
    }

    // ---- replies ----

    fn reply_base(&self, ty: MessageType, req: &Message) -> Message {
        let mut m = Message {
            op: wire::BOOTREPLY,
            htype: req.htype,
            hlen: req.hlen,
            xid: req.xid,
            flags: req.flags,
            giaddr: req.giaddr,
            chaddr: req.chaddr,
            ..Message::default()
        };
        if ty != MessageType::Nak && ty != MessageType::Offer {
            m.ciaddr = req.ciaddr;
        }
        m
    }

    fn lease_reply(&self, ty: MessageType, req: &Message, ip: u32) -> Reply {
        let mut m = self.reply_base(ty, req);
        m.yiaddr = ip.into();
        m.options = self.fit(req, ty, true);
        let dst_mac = req.client_mac().expect("checked in handle");
        let dst_ip = if let Some(ci) = nonzero(req.ciaddr) {
            ci
        } else if req.broadcast_flag() {
            Ipv4Addr::BROADCAST
        } else {
            m.yiaddr
        };
        let dst_mac = if dst_ip == Ipv4Addr::BROADCAST { [0xff; 6] } else { dst_mac };
        Reply { msg: m, dst_ip, dst_mac }
    }

    fn nak(&self, req: &Message, text: &str) -> Reply {
        let mut m = self.reply_base(MessageType::Nak, req);
        m.set_option(opt::MESSAGE_TYPE, [MessageType::Nak as u8]);
        m.set_option(opt::SERVER_ID, self.cfg.server_ip.octets());
        m.set_option(opt::MESSAGE, text.as_bytes());
        Reply { msg: m, dst_ip: Ipv4Addr::BROADCAST, dst_mac: [0xff; 6] }
    }

    /// The options of an OFFER or ACK (`lease`: with 51/58/59), in order: 53, then those the
    /// client listed in 55 in its order, then the rest. Trimmed to the client's maximum message
    /// size by keeping, in that order, each option that still fits (53, 54 and 51 always stay):
    /// unrequested options go first.
    fn fit(&self, req: &Message, ty: MessageType, lease: bool) -> Vec<DhcpOption> {
        let cfg = &self.cfg;
        let mut all: Vec<DhcpOption> = Vec::with_capacity(12);
        let mut add = |code: u8, data: Vec<u8>| all.push(DhcpOption { code, data });
        add(opt::SERVER_ID, cfg.server_ip.octets().to_vec());
        if lease {
            let t = u64::from(cfg.lease_time);
            add(opt::LEASE_TIME, cfg.lease_time.to_be_bytes().to_vec());
            add(opt::RENEWAL_TIME, ((t / 2) as u32).to_be_bytes().to_vec());
            add(opt::REBINDING_TIME, ((t * 7 / 8) as u32).to_be_bytes().to_vec());
        }
        add(opt::SUBNET_MASK, cfg.subnet.mask().to_be_bytes().to_vec());
        add(opt::ROUTER, cfg.router.octets().to_vec());
        if !cfg.dns.is_empty() {
            add(opt::DNS, cfg.dns.iter().flat_map(|a| a.octets()).collect());
        }
        if let Some(d) = &cfg.domain_name {
            add(opt::DOMAIN_NAME, d.as_bytes().to_vec());
        }
        if let Some(mtu) = cfg.mtu {
            add(opt::INTERFACE_MTU, mtu.to_be_bytes().to_vec());
        }
        add(opt::BROADCAST_ADDRESS, cfg.subnet.broadcast().octets().to_vec());

        // Requested ones first, in the client's order (each once).
        let prl = req.parameter_request_list().unwrap_or(&[]);
        let mut n_requested = 0;
        for (i, code) in prl.iter().enumerate() {
            if prl[..i].contains(code) {
                continue;
            }
            if let Some(pos) = all[n_requested..].iter().position(|o| o.code == *code) {
                let o = all.remove(n_requested + pos);
                all.insert(n_requested, o);
                n_requested += 1;
            }
        }
        let mut out = Vec::with_capacity(all.len() + 1);
        out.push(DhcpOption { code: opt::MESSAGE_TYPE, data: vec![ty as u8] });
        out.extend(all);

        // Keep what fits, in order of priority: the mandatory ones, then the others in the order
        // above (requested ones first).
        let max_ip = req.max_message_size().unwrap_or(0).max(wire::MIN_MAX_MESSAGE_SIZE) as usize;
        let mandatory = |o: &DhcpOption| matches!(o.code, opt::MESSAGE_TYPE | opt::SERVER_ID | opt::LEASE_TIME);
        let size = |o: &DhcpOption| wire::options_len(std::slice::from_ref(o));
        let limit = max_ip - wire::IP_UDP_OVERHEAD - (wire::FIXED_LEN + 4 + 1);
        let mut budget = limit.saturating_sub(out.iter().filter(|o| mandatory(o)).map(size).sum());
        out.retain(|o| {
            if mandatory(o) {
                return true;
            }
            let fits = size(o) <= budget;
            if fits {
                budget -= size(o);
            }
            fits
        });
        out
    }

    #[cfg(test)]
    fn check_invariants(&self, now: u64) {
        for (ip, r) in &self.records {
            assert_eq!(u32::from(r.lease.ip), *ip);
            assert_eq!(self.by_key.get(&r.lease.client_key), Some(ip), "by_key of {ip}");
            assert!(r.lease.client_key.ends_with(&r.lease.mac), "the key of {ip} ends with its MAC");
            if let Some(c) = r.lease.conn {
                assert_eq!(self.by_conn.get(&c), Some(ip), "by_conn of {ip}");
            }
            assert!(!self.quarantine.contains_key(ip));
            assert!(self.in_pool(*ip) || self.reserved_ips.contains(ip));
            assert!(!self.off_limits(r.lease.ip, Some(r.lease.mac)) || !r.bound, "{} leased", r.lease.ip);
        }
        assert_eq!(self.by_key.len(), self.records.len());
        for (c, ip) in &self.by_conn {
            assert_eq!(self.records[ip].lease.conn, Some(*c));
        }
        assert!(self.free_count(now) <= self.pool_size);
    }
}

fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

/// Who sent a message.
struct Client<'a> {
    conn: ConnId,
    chaddr: [u8; 6],
    key: &'a [u8],
}

/// For tests here and in the relay: 192.168.2.0/24 served from 192.168.2.1 (also the router
/// and first DNS server), the whole subnet as pool, one-hour leases.
#[cfg(test)]
impl ServerConfig {
    pub(crate) fn for_tests() -> ServerConfig {
        let server = Ipv4Addr::new(192, 168, 2, 1);
        ServerConfig {
            server_ip: server,
            subnet: "192.168.2.0/24".parse().unwrap(),
            router: server,
            dns: vec![server, Ipv4Addr::new(9, 9, 9, 9)],
            domain_name: Some("vm.test".into()),
            mtu: Some(1500),
            lease_time: 3600,
            range: None,
            reservations: vec![],
            grace: 300,
            quarantine: 600,
            offer_timeout: 60,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use MessageType::*;

    const T0: u64 = 1_700_000_000;
    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 2, n)
    }

    fn mac(i: u32) -> [u8; 6] {
        let b = i.to_be_bytes();
        [0x52, 0x54, b[0], b[1], b[2], b[3]]
    }

    fn cfg() -> ServerConfig {
        ServerConfig::for_tests()
    }

    fn server() -> Server {
        Server::new(cfg()).unwrap()
    }

    fn req(ty: MessageType, m: [u8; 6]) -> Message {
        let mut chaddr = [0; 16];
        chaddr[..6].copy_from_slice(&m);
        let mut msg =
            Message { op: wire::BOOTREQUEST, htype: 1, hlen: 6, xid: 0x1234_5678, chaddr, ..Message::default() };
        msg.set_option(opt::MESSAGE_TYPE, [ty as u8]);
        msg
    }

    fn with(mut msg: Message, code: u8, data: &[u8]) -> Message {
        msg.set_option(code, data);
        msg
    }

    fn selecting(m: [u8; 6], want: Ipv4Addr, server: Ipv4Addr) -> Message {
        with(with(req(Request, m), opt::REQUESTED_IP, &want.octets()), opt::SERVER_ID, &server.octets())
    }

    fn init_reboot(m: [u8; 6], want: Ipv4Addr) -> Message {
        with(req(Request, m), opt::REQUESTED_IP, &want.octets())
    }

    fn renew(m: [u8; 6], ciaddr: Ipv4Addr) -> Message {
        Message { ciaddr, ..req(Request, m) }
    }

    fn ty(r: &Option<Reply>) -> Option<MessageType> {
        r.as_ref().and_then(|r| r.msg.message_type())
    }

    fn codes(r: &Reply) -> Vec<u8> {
        r.msg.options.iter().map(|o| o.code).collect()
    }

    /// DISCOVER then REQUEST; returns the address ACKed.
    fn dora(s: &mut Server, conn: ConnId, m: [u8; 6], now: u64) -> Ipv4Addr {
        let offer = s.handle(conn, m, true, &req(Discover, m), now);
        assert_eq!(ty(&offer), Some(Offer), "offer for conn {conn}");
        let yi = offer.unwrap().msg.yiaddr;
        let ack = s.handle(conn, m, true, &selecting(m, yi, SERVER), now);
        assert_eq!(ty(&ack), Some(Ack));
        assert_eq!(ack.unwrap().msg.yiaddr, yi);
        s.check_invariants(now);
        yi
    }

    fn lease_of(s: &Server, a: Ipv4Addr) -> &Lease {
        s.leases().find(|l| l.ip == a).expect("a lease")
    }

    #[test]
    fn discover_offer_request_ack() {
        let mut s = server();
        assert_eq!(s.pool_size(), 253);
        assert_eq!(s.free_count(T0), 253);
        let m = mac(1);
        let d = with(with(req(Discover, m), opt::HOST_NAME, b"guest"), opt::CLIENT_ID, &[1, 0x52, 0x54, 0, 0, 0, 1]);
        let offer = s.handle(7, m, true, &d, T0).unwrap();
        assert_eq!(offer.msg.message_type(), Some(Offer));
        assert_eq!((offer.msg.op, offer.msg.xid, offer.msg.yiaddr), (wire::BOOTREPLY, 0x1234_5678, ip(2)));
        assert_eq!(offer.msg.chaddr, d.chaddr);
        assert_eq!(codes(&offer), [53, 54, 51, 58, 59, 1, 3, 6, 15, 26, 28]);
        assert_eq!(offer.msg.server_id(), Some(SERVER));
        assert_eq!(offer.msg.lease_time(), Some(3600));
        assert_eq!(offer.msg.option(opt::RENEWAL_TIME), Some(&1800u32.to_be_bytes()[..]));
        assert_eq!(offer.msg.option(opt::REBINDING_TIME), Some(&3150u32.to_be_bytes()[..]));
        assert_eq!(offer.msg.option(opt::SUBNET_MASK), Some(&[255, 255, 255, 0][..]));
        assert_eq!(offer.msg.option(opt::DNS), Some(&[192, 168, 2, 1, 9, 9, 9, 9][..]));
        assert_eq!(offer.msg.option(opt::DOMAIN_NAME), Some(&b"vm.test"[..]));
        assert_eq!(offer.msg.option(opt::INTERFACE_MTU), Some(&[0x05, 0xdc][..]));
        assert_eq!(offer.msg.option(opt::BROADCAST_ADDRESS), Some(&[192, 168, 2, 255][..]));
        // An offer reserves its address but is not a lease.
        assert_eq!(s.leases().count(), 0);
        assert_eq!(s.free_count(T0), 252);
        assert!(!s.take_dirty());
        // A second client gets the next address.
        assert_eq!(s.handle(8, mac(2), true, &req(Discover, mac(2)), T0).unwrap().msg.yiaddr, ip(3));

        let r = with(selecting(m, ip(2), SERVER), opt::CLIENT_ID, &[1, 0x52, 0x54, 0, 0, 0, 1]);
        let ack = s.handle(7, m, true, &r, T0 + 1).unwrap();
        assert_eq!(ack.msg.message_type(), Some(Ack));
        assert_eq!(ack.msg.yiaddr, ip(2));
        assert_eq!(codes(&ack), [53, 54, 51, 58, 59, 1, 3, 6, 15, 26, 28]);
        let l = lease_of(&s, ip(2));
        assert_eq!((l.conn, l.expires, l.mac), (Some(7), T0 + 1 + 3600, m));
        assert_eq!(l.client_key, [1, 0x52, 0x54, 0, 0, 0, 1]); // client id, not chaddr
        assert_eq!(l.hostname, b"guest");
        assert!(s.take_dirty());
        assert!(!s.take_dirty());
        // The client identifier 01:<mac> and a bare chaddr are the same client.
        assert_eq!(s.handle(7, m, true, &req(Discover, m), T0 + 2).unwrap().msg.yiaddr, ip(2));
        s.check_invariants(T0 + 2);
    }

    #[test]
    fn offer_prefers_own_then_requested_then_lowest() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        assert_eq!(a, ip(2));
        // Requested and free.
        let d = with(req(Discover, mac(2)), opt::REQUESTED_IP, &ip(77).octets());
        assert_eq!(s.handle(2, mac(2), true, &d, T0).unwrap().msg.yiaddr, ip(77));
        // Requested but taken, or outside the pool: the lowest free instead.
        for want in [ip(2), ip(1), ip(255), Ipv4Addr::new(10, 0, 0, 5)] {
            let d = with(req(Discover, mac(3)), opt::REQUESTED_IP, &want.octets());
            assert_eq!(s.handle(3, mac(3), true, &d, T0).unwrap().msg.yiaddr, ip(3));
        }
        // Its own address wins over the requested one.
        let d = with(req(Discover, mac(1)), opt::REQUESTED_IP, &ip(99).octets());
        assert_eq!(s.handle(1, mac(1), true, &d, T0).unwrap().msg.yiaddr, ip(2));
    }

    /// A live connection's lease that runs out moves the epoch at the next `expire`, also one
    /// taken back from its grace by a reconnect after the earliest lease end was computed.
    /// Renewing a running lease on its connection changes no answer: the epoch stays (else N
    /// clients renewing in a loop would send every frame of every client to the shared lock).
    /// Renewing one that ran out, or from another connection, moves it.
    #[test]
    fn only_a_renewal_that_changes_an_answer_moves_the_epoch() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        let e = s.epoch();
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), a), T0 + 10)), Some(Ack));
        assert_eq!(s.epoch(), e);
        assert_eq!(s.bound_ip(1, T0 + 3605), Some(a), "renewed");
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), a), T0 + 10_000)), Some(Ack));
        assert_ne!(s.epoch(), e, "it had run out");
        let e = s.epoch();
        assert_eq!(ty(&s.handle(2, mac(1), false, &renew(mac(1), a), T0 + 10_001)), Some(Ack));
        assert_ne!(s.epoch(), e, "another connection");
    }

    #[test]
    fn a_lease_running_out_moves_the_epoch() {
        let mut s = server();
        let bind = |s: &mut Server, conn, m, now| {
            let offer = s.handle(conn, m, true, &req(Discover, m), now).unwrap().msg.yiaddr;
            assert_eq!(ty(&s.handle(conn, m, true, &selecting(m, offer, SERVER), now)), Some(Ack));
            offer
        };
        bind(&mut s, 2, mac(2), T0); // runs out at T0 + 3600
        let a = bind(&mut s, 1, mac(1), T0 + 3400); // runs out at T0 + 7000
        s.connection_closed(1, T0 + 3500); // in grace until T0 + 3800
        let e = s.epoch();
        s.expire(T0 + 3601);
        assert_ne!(s.epoch(), e, "connection 2's lease ran out");
        // Connection 3 is client 1 again: its DISCOVER takes the lease back from its grace.
        assert_eq!(s.handle(3, mac(1), true, &req(Discover, mac(1)), T0 + 3700).unwrap().msg.yiaddr, a);
        assert_eq!(s.bound_ip(3, T0 + 3700), Some(a));
        let e = s.epoch();
        s.expire(T0 + 6999);
        assert_eq!(s.epoch(), e);
        s.expire(T0 + 7001);
        assert_ne!(s.epoch(), e, "the lease taken back ran out");
        assert_eq!(s.bound_ip(3, T0 + 7001), None);
    }

    #[test]
    fn selecting_nak_and_other_server() {
        let mut s = server();
        let offer = s.handle(1, mac(1), true, &req(Discover, mac(1)), T0).unwrap();
        assert_eq!(offer.msg.yiaddr, ip(2));
        // Asking for something else than the offer: NAK, broadcast, options 53, 54, 56 only.
        let nak = s.handle(1, mac(1), true, &selecting(mac(1), ip(9), SERVER), T0).unwrap();
        assert_eq!(nak.msg.message_type(), Some(Nak));
        assert_eq!(codes(&nak), [53, 54, 56]);
        assert_eq!((nak.dst_ip, nak.dst_mac), (Ipv4Addr::BROADCAST, [0xff; 6]));
        assert_eq!((nak.msg.yiaddr, nak.msg.ciaddr), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED));
        // The client took another server's offer: ours is dropped, nothing is sent.
        assert_eq!(s.free_count(T0), 252);
        assert!(s.handle(1, mac(1), true, &selecting(mac(1), ip(2), Ipv4Addr::new(192, 168, 2, 254)), T0).is_none());
        assert_eq!(s.free_count(T0), 253);
        assert!(s.records.is_empty());
        // Now nothing is offered to it: a REQUEST to us is refused.
        assert_eq!(ty(&s.handle(1, mac(1), true, &selecting(mac(1), ip(2), SERVER), T0)), Some(Nak));
        // Another server's choice does not drop a bound lease.
        let a = dora(&mut s, 2, mac(2), T0);
        assert!(s.handle(2, mac(2), true, &selecting(mac(2), a, Ipv4Addr::new(10, 0, 0, 1)), T0).is_none());
        assert_eq!(lease_of(&s, a).conn, Some(2));
    }

    #[test]
    fn init_reboot_ack_nak_silent() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        // Its own address: ACK (to the broadcast address: ciaddr is 0 and the flag is set here).
        let m = Message { flags: wire::FLAG_BROADCAST, ..init_reboot(mac(1), a) };
        let ack = s.handle(1, mac(1), true, &m, T0 + 10).unwrap();
        assert_eq!((ack.msg.message_type(), ack.msg.yiaddr), (Some(Ack), a));
        assert_eq!((ack.dst_ip, ack.dst_mac), (Ipv4Addr::BROADCAST, [0xff; 6]));
        assert_eq!(lease_of(&s, a).expires, T0 + 10 + 3600);
        // Another address of the subnet: NAK. Outside the subnet: NAK.
        assert_eq!(ty(&s.handle(1, mac(1), true, &init_reboot(mac(1), ip(50)), T0)), Some(Nak));
        assert_eq!(ty(&s.handle(1, mac(1), true, &init_reboot(mac(1), Ipv4Addr::new(10, 1, 1, 1)), T0)), Some(Nak));
        // A client we do not know: NAK (wsnic is the only server its clients reach).
        assert_eq!(ty(&s.handle(2, mac(2), true, &init_reboot(mac(2), ip(60)), T0)), Some(Nak));
        assert_eq!(ty(&s.handle(2, mac(2), true, &init_reboot(mac(2), SERVER), T0)), Some(Nak));
        assert_eq!(ty(&s.handle(2, mac(2), true, &init_reboot(mac(2), Ipv4Addr::new(10, 1, 1, 1)), T0)), Some(Nak));
        // The NAKs changed nothing.
        assert_eq!(lease_of(&s, a).conn, Some(1));
    }

    #[test]
    fn renewing_and_rebinding() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        s.take_dirty();
        for (broadcast, t) in [(false, T0 + 1800), (true, T0 + 3150)] {
            let ack = s.handle(1, mac(1), broadcast, &renew(mac(1), a), t).unwrap();
            assert_eq!((ack.msg.message_type(), ack.msg.yiaddr, ack.msg.ciaddr), (Some(Ack), a, a));
            assert_eq!((ack.dst_ip, ack.dst_mac), (a, mac(1))); // unicast to ciaddr
            assert_eq!(lease_of(&s, a).expires, t + 3600);
            assert!(s.take_dirty());
        }
        // ciaddr is not its address, or an unknown client: NAK.
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), ip(40)), T0)), Some(Nak));
        assert_eq!(ty(&s.handle(2, mac(2), false, &renew(mac(2), ip(40)), T0)), Some(Nak));
        // An expired lease nobody took is still renewed.
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), a), T0 + 100_000)), Some(Ack));
    }

    #[test]
    fn decline_quarantines_until_it_ends() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        s.take_dirty();
        // Declining an address that is not yours does nothing.
        s.handle(2, mac(2), true, &with(req(Decline, mac(2)), opt::REQUESTED_IP, &a.octets()), T0);
        assert_eq!(lease_of(&s, a).conn, Some(1));
        let decline =
            with(with(req(Decline, mac(1)), opt::REQUESTED_IP, &a.octets()), opt::SERVER_ID, &SERVER.octets());
        assert!(s.handle(1, mac(1), true, &decline, T0 + 5).is_none());
        assert_eq!(s.leases().count(), 0);
        assert!(s.take_dirty());
        assert_eq!(s.free_count(T0 + 5), 252);
        s.check_invariants(T0 + 5);
        // The client (and anyone else) gets another address, even asking for the declined one.
        let d = with(req(Discover, mac(1)), opt::REQUESTED_IP, &a.octets());
        assert_eq!(s.handle(1, mac(1), true, &d, T0 + 6).unwrap().msg.yiaddr, ip(3));
        assert_eq!(dora(&mut s, 2, mac(2), T0 + 6), ip(4));
        // The quarantine ends after 600 s.
        s.expire(T0 + 605);
        assert_eq!(s.free_count(T0 + 605), 251);
        s.expire(T0 + 606);
        assert_eq!(s.free_count(T0 + 606), 252);
        assert_eq!(dora(&mut s, 3, mac(3), T0 + 606), a);
    }

    /// One connection cannot quarantine the pool address by address: only the lease
    /// acknowledged to it counts, once per connection; an offer declined is not quarantined.
    #[test]
    fn declines_cannot_empty_the_pool() {
        let decline = |m: [u8; 6], a: Ipv4Addr| with(req(Decline, m), opt::REQUESTED_IP, &a.octets());
        let mut s = small((10, 30));
        let v = dora(&mut s, 9, mac(9), T0);
        s.connection_closed(9, T0);
        for i in 0..50 {
            let a = dora(&mut s, 1, mac(1), T0 + i);
            assert!(s.handle(1, mac(1), true, &decline(mac(1), a), T0 + i).is_none());
        }
        assert_eq!(s.quarantine.len(), 1);
        let o = s.handle(2, mac(2), true, &req(Discover, mac(2)), T0 + 60).unwrap().msg.yiaddr;
        s.handle(2, mac(2), true, &decline(mac(2), o), T0 + 60);
        assert_eq!(s.quarantine.len(), 1);
        assert!(s.leases().any(|l| l.ip == v), "the disconnected client's lease is still remembered");
        assert_eq!(s.free_count(T0 + 60), 21 - 3); // v in grace, one quarantined, one offered
        s.check_invariants(T0 + 60);
        // A new connection may quarantine once again.
        s.connection_closed(1, T0 + 61);
        let a = dora(&mut s, 3, mac(1), T0 + 61);
        s.handle(3, mac(1), true, &decline(mac(1), a), T0 + 61);
        assert_eq!(s.quarantine.len(), 2);
        // A client that keeps finding its address in use is not offered the same one again.
        let mut s = small((10, 14));
        let mut got = Vec::new();
        for i in 0..4 {
            let a = dora(&mut s, 1, mac(1), T0 + i);
            assert!(!got.contains(&a), "{a} offered again after a DECLINE");
            got.push(a);
            s.handle(1, mac(1), true, &decline(mac(1), a), T0 + i);
        }
        s.check_invariants(T0 + 5);
    }

    /// Connections cycling with new keys leave at most `max_records` records behind (in memory
    /// and in the lease file), however large the pool; live connections still get addresses
    /// beyond it; a lease file over it keeps the leases that end last.
    #[test]
    fn remembered_leases_are_bounded() {
        let mut s = server();
        s.max_records = 8;
        for conn in 0..100u64 {
            dora(&mut s, conn, mac(conn as u32), T0 + conn);
            s.connection_closed(conn, T0 + conn);
            assert!(s.records.len() <= 8, "{} records after {conn}", s.records.len());
        }
        s.check_invariants(T0 + 100);
        for conn in 200..212u64 {
            dora(&mut s, conn, mac(conn as u32), T0 + 200);
        }
        assert_eq!(s.records.len(), 12, "twelve live connections, twelve leases");
        s.check_invariants(T0 + 200);
        // At the bound, a live connection's outstanding offer is not taken from it.
        let mut u = server();
        u.max_records = 8;
        for conn in 1..8u64 {
            dora(&mut u, conn, mac(conn as u32), T0);
            u.connection_closed(conn, T0);
        }
        let o = u.handle(8, mac(8), true, &req(Discover, mac(8)), T0).unwrap().msg.yiaddr;
        assert_ne!(u.handle(9, mac(9), true, &req(Discover, mac(9)), T0 + 1).unwrap().msg.yiaddr, o);
        assert_eq!(ty(&u.handle(8, mac(8), true, &selecting(mac(8), o, SERVER), T0 + 2)), Some(Ack));
        u.check_invariants(T0 + 2);
        let leases: Vec<Lease> = s.leases().cloned().collect();
        let mut t = server();
        t.max_records = 8;
        t.load(leases, T0 + 300);
        assert_eq!(t.records.len(), 8);
        t.check_invariants(T0 + 300);
    }

    #[test]
    fn release_frees() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        s.take_dirty();
        // Wrong ciaddr: ignored.
        s.handle(1, mac(1), false, &Message { ciaddr: ip(9), ..req(Release, mac(1)) }, T0);
        assert_eq!(s.leases().count(), 1);
        s.handle(1, mac(1), false, &Message { ciaddr: a, ..req(Release, mac(1)) }, T0);
        assert_eq!(s.leases().count(), 0);
        assert!(s.take_dirty());
        assert_eq!(s.free_count(T0), 253);
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), a), T0)), Some(Nak), "released");
        s.check_invariants(T0);
    }

    #[test]
    fn inform() {
        let mut s = server();
        let m = Message { ciaddr: ip(200), ..with(req(Inform, mac(5)), opt::PARAMETER_REQUEST_LIST, &[6, 1]) };
        let ack = s.handle(1, mac(5), false, &m, T0).unwrap();
        assert_eq!(ack.msg.message_type(), Some(Ack));
        assert_eq!((ack.msg.yiaddr, ack.msg.ciaddr), (Ipv4Addr::UNSPECIFIED, ip(200)));
        assert_eq!(codes(&ack), [53, 6, 1, 54, 3, 15, 26, 28]);
        assert_eq!((ack.dst_ip, ack.dst_mac), (ip(200), mac(5)));
        assert_eq!(s.leases().count(), 0);
        assert!(s.handle(1, mac(5), false, &req(Inform, mac(5)), T0).is_none());
        // no ciaddr
    }

    #[test]
    fn reply_destinations() {
        let mut s = server();
        // No broadcast flag, no ciaddr: unicast to yiaddr and chaddr (the frame's source MAC is not used).
        let offer = s.handle(1, mac(9), true, &req(Discover, mac(1)), T0).unwrap();
        assert_eq!((offer.dst_ip, offer.dst_mac), (ip(2), mac(1)));
        // Broadcast flag: broadcast.
        let m = Message { flags: wire::FLAG_BROADCAST, ..selecting(mac(1), ip(2), SERVER) };
        let ack = s.handle(1, mac(1), true, &m, T0).unwrap();
        assert_eq!((ack.dst_ip, ack.dst_mac), (Ipv4Addr::BROADCAST, [0xff; 6]));
        assert_eq!(ack.msg.flags, wire::FLAG_BROADCAST);
        // ciaddr set: unicast to it, even with the flag.
        let m = Message { flags: wire::FLAG_BROADCAST, ..renew(mac(1), ip(2)) };
        let ack = s.handle(1, mac(1), false, &m, T0).unwrap();
        assert_eq!((ack.dst_ip, ack.dst_mac), (ip(2), mac(1)));
        // NAK: broadcast even with ciaddr.
        let nak = s.handle(1, mac(1), false, &renew(mac(1), ip(3)), T0).unwrap();
        assert_eq!((nak.msg.message_type(), nak.dst_ip, nak.dst_mac), (Some(Nak), Ipv4Addr::BROADCAST, [0xff; 6]));
    }

    #[test]
    fn options_in_the_clients_order() {
        let mut s = server();
        let d = with(req(Discover, mac(1)), opt::PARAMETER_REQUEST_LIST, &[6, 3, 1, 250, 3, 28, 51]);
        let offer = s.handle(1, mac(1), true, &d, T0).unwrap();
        assert_eq!(codes(&offer), [53, 6, 3, 1, 28, 51, 54, 58, 59, 15, 26]);
        // Unconfigured options are not sent.
        let mut c = cfg();
        (c.dns, c.domain_name, c.mtu) = (vec![], None, None);
        let mut s = Server::new(c).unwrap();
        assert_eq!(codes(&s.handle(1, mac(1), true, &d, T0).unwrap()), [53, 3, 1, 28, 51, 54, 58, 59]);
    }

    #[test]
    fn max_message_size() {
        let mut c = cfg();
        c.dns = (1..=70).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(); // 280 bytes: split in two
        c.domain_name = Some("d".repeat(200));
        let mut s = Server::new(c).unwrap();
        let encoded = |r: &Reply| {
            let mut out = Vec::new();
            wire::encode(&r.msg, &mut out);
            out.len()
        };
        // No option 57: 576-byte datagrams. DNS (284 bytes with its headers) does not fit; the rest does.
        let offer = s.handle(1, mac(1), true, &req(Discover, mac(1)), T0).unwrap();
        assert!(encoded(&offer) <= 576 - 28, "{}", encoded(&offer));
        assert_eq!(codes(&offer), [53, 54, 51, 58, 59, 1, 3, 15, 26, 28]);
        // A smaller stated maximum counts as 576. Requested options are kept over unrequested ones.
        let d = with(with(req(Discover, mac(1)), opt::MAX_MESSAGE_SIZE, &[1, 0]), opt::PARAMETER_REQUEST_LIST, &[6, 1]);
        let offer = s.handle(1, mac(1), true, &d, T0).unwrap();
        assert!(encoded(&offer) <= 576 - 28);
        assert_eq!(codes(&offer), [53, 6, 1, 54, 51]); // DNS and the mask leave room for nothing else
                                                       // Asking for more than fits: what fits, in the client's order, then the unrequested ones.
        let d = with(req(Discover, mac(1)), opt::PARAMETER_REQUEST_LIST, &[1, 3, 15, 6, 26, 28]);
        let offer = s.handle(1, mac(1), true, &d, T0).unwrap();
        assert!(encoded(&offer) <= 576 - 28);
        assert_eq!(codes(&offer), [53, 1, 3, 15, 26, 28, 54, 51, 58, 59]);
        // A large maximum: everything.
        let d = with(req(Discover, mac(1)), opt::MAX_MESSAGE_SIZE, &1500u16.to_be_bytes());
        let offer = s.handle(1, mac(1), true, &d, T0).unwrap();
        assert_eq!(codes(&offer), [53, 54, 51, 58, 59, 1, 3, 6, 15, 26, 28]);
        assert!(encoded(&offer) > 576 && encoded(&offer) <= 1500 - 28);
        assert_eq!(
            wire::decode(&{
                let mut out = Vec::new();
                wire::encode(&offer.msg, &mut out);
                out
            })
            .unwrap()
            .option(opt::DNS)
            .map(<[u8]>::len),
            Some(280)
        );
    }

    #[test]
    fn ignores_malformed() {
        let mut s = server();
        let good = req(Discover, mac(1));
        for bad in [
            Message { htype: 6, ..good.clone() },
            Message { hlen: 16, ..good.clone() },
            Message { op: wire::BOOTREPLY, ..good.clone() },
            with(good.clone(), opt::MESSAGE_TYPE, &[9]),
            with(good.clone(), opt::MESSAGE_TYPE, &[]),
            with(good.clone(), opt::CLIENT_ID, &[7; 300]),
            req(Offer, mac(1)),
            req(Ack, mac(1)),
            req(Nak, mac(1)),
            req(Request, mac(1)), // neither requested IP nor ciaddr
            with(req(Request, mac(1)), opt::SERVER_ID, &SERVER.octets()), // SELECTING without an address
        ] {
            assert!(s.handle(1, mac(1), true, &bad, T0).is_none(), "{bad:?}");
        }
        assert!(s.records.is_empty());
    }

    #[test]
    fn one_connection_flooding_macs_holds_one_address() {
        let mut s = server();
        for i in 0..1000 {
            dora(&mut s, 42, mac(i), T0 + u64::from(i));
            assert_eq!(s.leases().count(), 1);
        }
        // A flood of DISCOVERs alone (offers) holds one address too.
        for i in 1000..2000 {
            s.handle(42, mac(i), true, &req(Discover, mac(i)), T0 + 2000).unwrap();
        }
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.free_count(T0 + 2000), 252);
        s.check_invariants(T0 + 2000);
        // A guest switching client identifiers moves its address rather than taking a second.
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        let d = with(req(Discover, mac(1)), opt::CLIENT_ID, b"\x00systemd-duid");
        assert_eq!(s.handle(1, mac(1), true, &d, T0).unwrap().msg.yiaddr, a);
        assert_eq!(s.leases().count(), 0); // the old lease is gone, the new one only offered
    }

    #[test]
    fn a_thousand_connections_come_and_go() {
        let mut s = server();
        let mut now = T0;
        for conn in 0..1000u64 {
            now += 1;
            dora(&mut s, conn, mac(conn as u32), now);
            s.connection_closed(conn, now + 1);
            s.expire(now);
        }
        assert_eq!(s.leases().count(), 253);
        // With all connections gone the pool is full of graces and remembered leases, none pinned.
        assert!(s.records.values().all(|r| !r.pinned(now)));
        assert_eq!(s.exhaustion_warnings, 0);
    }

    fn small(range: (u8, u8)) -> Server {
        Server::new(ServerConfig { range: Some((ip(range.0), ip(range.1))), ..cfg() }).unwrap()
    }

    #[test]
    fn exhaustion_warns_once_per_episode() {
        let mut s = small((10, 14));
        assert_eq!(s.pool_size(), 5);
        for conn in 0..5 {
            assert_eq!(dora(&mut s, conn, mac(conn as u32), T0), ip(10 + conn as u8));
        }
        assert_eq!(s.free_count(T0), 0);
        for i in 0..10 {
            assert!(s.handle(100 + i, mac(100 + i as u32), true, &req(Discover, mac(100)), T0 + i).is_none());
            s.expire(T0 + i);
        }
        assert_eq!(s.exhaustion_warnings, 1);
        // A re-DISCOVER of a client that holds an address is answered and does not end the episode.
        assert_eq!(s.handle(0, mac(0), true, &req(Discover, mac(0)), T0).unwrap().msg.yiaddr, ip(10));
        assert!(s.handle(100, mac(100), true, &req(Discover, mac(100)), T0).is_none());
        assert_eq!(s.exhaustion_warnings, 1);
        // One connection closes: its grace gives way to the waiting client, at once.
        s.connection_closed(3, T0 + 20);
        assert_eq!(s.free_count(T0 + 20), 0); // held by grace, yet reclaimable
        assert_eq!(dora(&mut s, 100, mac(100), T0 + 20), ip(13));
        // A new episode warns again.
        assert!(s.handle(101, mac(101), true, &req(Discover, mac(101)), T0 + 21).is_none());
        assert_eq!(s.exhaustion_warnings, 2);
        // A quarantined address is the last resort.
        let decline = with(req(Decline, mac(0)), opt::REQUESTED_IP, &ip(10).octets());
        s.handle(0, mac(0), true, &decline, T0 + 22);
        assert_eq!(s.quarantine.len(), 1);
        assert_eq!(dora(&mut s, 101, mac(101), T0 + 22), ip(10));
        assert!(s.quarantine.is_empty());
        s.check_invariants(T0 + 22);
        assert!(s.handle(102, mac(102), true, &req(Discover, mac(102)), T0 + 22).is_none());
        assert_eq!(s.exhaustion_warnings, 3);
    }

    #[test]
    fn expired_leases_of_live_connections_return_to_the_pool() {
        let mut s = Server::new(ServerConfig { range: Some((ip(10), ip(11))), lease_time: 100, ..cfg() }).unwrap();
        dora(&mut s, 1, mac(1), T0);
        dora(&mut s, 2, mac(2), T0 + 50);
        assert!(s.handle(3, mac(3), true, &req(Discover, mac(3)), T0 + 100).is_none());
        // Connection 1 is alive but its lease ran out at T0 + 100.
        assert_eq!(s.free_count(T0 + 101), 1);
        assert_eq!(dora(&mut s, 3, mac(3), T0 + 101), ip(10));
        // Client 1 renewing the address that is now client 3's is told no, not left to keep using it.
        let r = s.handle(1, mac(1), false, &renew(mac(1), ip(10)), T0 + 102).expect("a NAK");
        assert_eq!(r.msg.message_type(), Some(MessageType::Nak));
    }

    #[test]
    fn reconnect_within_grace_keeps_the_address() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        s.connection_closed(1, T0 + 10);
        assert_eq!(lease_of(&s, a).conn, None);
        assert_eq!(s.free_count(T0 + 10), 252);
        // Others come meanwhile; the address stays out of their way.
        for conn in 2..50 {
            assert_ne!(dora(&mut s, conn, mac(conn as u32), T0 + 20), a);
        }
        // The same client on a new connection: INIT-REBOOT is ACKed and the lease moves.
        let ack = s.handle(77, mac(1), true, &init_reboot(mac(1), a), T0 + 300).unwrap();
        assert_eq!((ack.msg.message_type(), ack.msg.yiaddr), (Some(Ack), a));
        assert_eq!(lease_of(&s, a).conn, Some(77));
        // The old connection's close (late) does not touch it.
        s.connection_closed(1, T0 + 301);
        assert_eq!(lease_of(&s, a).conn, Some(77));
        s.check_invariants(T0 + 301);
        // Past the grace, an unclaimed address is still the client's if nobody needed it.
        s.connection_closed(77, T0 + 400);
        assert_eq!(s.free_count(T0 + 701), 253 - 48);
        assert_eq!(s.handle(78, mac(1), true, &req(Discover, mac(1)), T0 + 10_000).unwrap().msg.yiaddr, a);
    }

    /// A client naming another's MAC as its identifier gets a key of its own: it can neither
    /// take nor release the other's lease, nor lock the other out of it.
    #[test]
    fn a_client_identifier_names_no_other_mac() {
        let mut s = server();
        let v = dora(&mut s, 1, mac(1), T0);
        let victim_id = [&[1u8][..], &mac(1)].concat();
        let m = with(init_reboot(mac(2), v), opt::CLIENT_ID, &victim_id);
        assert_eq!(s.key_held_elsewhere(2, &m), None);
        assert_eq!(ty(&s.handle(2, mac(2), true, &m, T0 + 1)), Some(Nak));
        let rel = with(Message { ciaddr: v, ..req(Release, mac(2)) }, opt::CLIENT_ID, &victim_id);
        s.handle(2, mac(2), true, &rel, T0 + 2);
        assert_eq!(s.bound_ip(1, T0 + 2), Some(v));
        // Its own DORA with that identifier gets another address, and the victim renews.
        let d = with(req(Discover, mac(2)), opt::CLIENT_ID, &victim_id);
        let o = s.handle(2, mac(2), true, &d, T0 + 3).unwrap().msg.yiaddr;
        assert_ne!(o, v);
        assert_eq!(s.key_held_elsewhere(1, &renew(mac(1), v)), None);
        assert_eq!(ty(&s.handle(1, mac(1), false, &renew(mac(1), v), T0 + 4)), Some(Ack));
    }

    /// A lease's MAC is its chaddr, which its key ends with, also when the frame came from
    /// another MAC (possible without anti-spoofing): it survives a restart.
    #[test]
    fn a_lease_keeps_its_key_across_a_restart_whatever_mac_sent_it() {
        let mut s = server();
        let d = s.handle(1, mac(9), true, &req(Discover, mac(1)), T0).unwrap().msg.yiaddr;
        assert_eq!(ty(&s.handle(1, mac(9), true, &selecting(mac(1), d, SERVER), T0)), Some(Ack));
        assert_eq!(lease_of(&s, d).mac, mac(1));
        let mut t = server();
        t.load(s.leases().cloned().collect(), T0 + 10);
        assert_eq!(ty(&t.handle(2, mac(1), true, &init_reboot(mac(1), d), T0 + 11)), Some(Ack));
        t.check_invariants(T0 + 11);
    }

    /// Guests cloned from one image send the same DUID-based identifier from different MACs:
    /// each gets an address of its own, and keeps it across a restart (lease file keys from
    /// before the MAC was part of every key are brought up to the rule).
    #[test]
    fn one_identifier_from_two_macs_is_two_clients() {
        let duid = [0xff, 0, 0, 0, 1, 0, 4, 0xde, 0xad, 0xbe, 0xef];
        let dora_id = |s: &mut Server, conn: ConnId, m: [u8; 6], now: u64| {
            let d = with(req(Discover, m), opt::CLIENT_ID, &duid);
            let o = s.handle(conn, m, true, &d, now).unwrap().msg.yiaddr;
            let r = with(selecting(m, o, SERVER), opt::CLIENT_ID, &duid);
            assert_eq!(ty(&s.handle(conn, m, true, &r, now)), Some(Ack));
            o
        };
        let mut s = server();
        let a = dora_id(&mut s, 1, mac(1), T0);
        let b = dora_id(&mut s, 2, mac(2), T0);
        assert_ne!(a, b);
        assert_eq!(s.bound_ip(1, T0), Some(a));
        // A lease file written when the key was the identifier alone.
        let mut old: Vec<Lease> = s.leases().cloned().collect();
        for l in &mut old {
            l.client_key = duid.to_vec();
        }
        let mut s = server();
        s.load(old.into_iter().filter(|l| l.ip == a).collect(), T0 + 10);
        assert_eq!(dora_id(&mut s, 3, mac(1), T0 + 11), a);
    }

    /// A lease taken up by a connection's frames (no DHCP) is pinned again: not given to
    /// another client when the grace period is over, also after a restart. Only the MAC it was
    /// given to may take it up, only while it runs, and only a connection holding nothing.
    #[test]
    fn adopt_takes_a_lease_up_again() {
        let mut s = server();
        let v = dora(&mut s, 1, mac(1), T0);
        s.connection_closed(1, T0 + 1);
        assert!(!s.adopt(2, mac(2), v, T0 + 2), "another MAC");
        let o = s.handle(3, mac(3), true, &req(Discover, mac(3)), T0 + 2).unwrap().msg.yiaddr;
        assert!(!s.adopt(3, mac(1), v, T0 + 2), "a connection with an offer");
        let e = s.epoch();
        assert!(s.adopt(4, mac(1), v, T0 + 2));
        assert_ne!(s.epoch(), e);
        assert_eq!(s.bound_ip(4, T0 + 2), Some(v));
        assert!(s.held_by_other(v, 5, T0 + 2));
        let d = with(req(Discover, mac(5)), opt::REQUESTED_IP, &v.octets());
        assert_ne!(s.handle(5, mac(5), true, &d, T0 + 400).unwrap().msg.yiaddr, v);
        assert_eq!(ty(&s.handle(4, mac(1), false, &renew(mac(1), v), T0 + 401)), Some(Ack));
        s.check_invariants(T0 + 401);
        assert_ne!(o, v);
        // After a restart: the lease file's lease, with no connection.
        let leases: Vec<Lease> = s.leases().cloned().collect();
        let mut t = server();
        t.load(leases, T0 + 500);
        assert!(!t.adopt(6, mac(1), v, T0 + 500 + 3600 + 402), "run out");
        assert!(t.adopt(6, mac(1), v, T0 + 501));
        assert_eq!(t.bound_ip(6, T0 + 501), Some(v));
        t.check_invariants(T0 + 501);
    }

    /// An on-subnet DNS server's address is not in the pool: never offered, even when asked
    /// for (anti-spoofing keeps lease-less clients off it too).
    #[test]
    fn a_dns_server_address_is_never_leased() {
        let mut s = Server::new(ServerConfig { dns: vec![ip(53)], range: Some((ip(50), ip(55))), ..cfg() }).unwrap();
        assert_eq!(s.pool_size(), 5);
        let d = with(req(Discover, mac(1)), opt::REQUESTED_IP, &ip(53).octets());
        assert_ne!(s.handle(1, mac(1), true, &d, T0).unwrap().msg.yiaddr, ip(53));
        s.connection_closed(1, T0);
        for c in 2..7 {
            assert_ne!(dora(&mut s, c, mac(c as u32), T0), ip(53));
        }
        assert!(s.handle(9, mac(9), true, &req(Discover, mac(9)), T0).is_none(), "dry, not .53");
        assert_eq!(ty(&s.handle(9, mac(9), true, &init_reboot(mac(9), ip(53)), T0)), Some(Nak));
        s.check_invariants(T0);
    }

    #[test]
    fn same_key_on_another_live_connection_takes_the_lease() {
        let mut s = server();
        let a = dora(&mut s, 1, mac(1), T0);
        assert_eq!(dora(&mut s, 2, mac(1), T0 + 1), a);
        assert_eq!(lease_of(&s, a).conn, Some(2));
        s.connection_closed(1, T0 + 2);
        assert_eq!(lease_of(&s, a).conn, Some(2));
        s.check_invariants(T0 + 2);
    }

    #[test]
    fn graces_give_way_oldest_first() {
        let mut s = small((10, 13));
        for conn in 0..4 {
            dora(&mut s, conn, mac(conn as u32), T0);
        }
        s.connection_closed(2, T0 + 5);
        s.connection_closed(0, T0 + 6);
        s.connection_closed(1, T0 + 7);
        assert_eq!(dora(&mut s, 10, mac(10), T0 + 8), ip(12));
        assert_eq!(dora(&mut s, 11, mac(11), T0 + 8), ip(10));
        // An outstanding offer also gives way, after graces ending sooner.
        let offer = s.handle(12, mac(12), true, &req(Discover, mac(12)), T0 + 8).unwrap();
        assert_eq!(offer.msg.yiaddr, ip(11));
        assert_eq!(s.handle(13, mac(13), true, &req(Discover, mac(13)), T0 + 9).unwrap().msg.yiaddr, ip(11));
        // The first client lost its offer: its REQUEST is refused.
        assert_eq!(ty(&s.handle(12, mac(12), true, &selecting(mac(12), ip(11), SERVER), T0 + 9)), Some(Nak));
    }

    #[test]
    fn offers_time_out() {
        let mut s = small((10, 10));
        s.handle(1, mac(1), true, &req(Discover, mac(1)), T0).unwrap();
        assert_eq!(s.free_count(T0 + 60), 0);
        s.expire(T0 + 60);
        assert_eq!(s.records.len(), 1);
        s.expire(T0 + 61);
        assert!(s.records.is_empty());
        assert_eq!(s.free_count(T0 + 61), 1);
        // An offer to a client whose connection closes is dropped at once.
        s.handle(2, mac(2), true, &req(Discover, mac(2)), T0).unwrap();
        s.connection_closed(2, T0 + 1);
        assert!(s.records.is_empty());
    }

    #[test]
    fn load_puts_leases_in_grace() {
        let lease = |n: u8, expires: u64| Lease {
            ip: ip(n),
            mac: mac(u32::from(n)),
            client_key: [&[1u8][..], &mac(u32::from(n))].concat(),
            hostname: b"h".to_vec(),
            expires,
            conn: Some(99),
        };
        let mut s = small((10, 13));
        s.load(
            vec![
                lease(10, T0 + 1000),
                lease(11, T0 + 1000),
                lease(12, T0 - 1), // expired: remembered, free
                lease(13, T0 + 1000),
                lease(13, T0 + 1000), // the same address twice
                lease(50, T0 + 1000), // outside the range now
            ],
            T0,
        );
        assert!(s.take_dirty()); // two dropped: the file should be rewritten
        assert_eq!(s.leases().count(), 4);
        assert!(s.leases().all(|l| l.conn.is_none()));
        assert_eq!(s.free_count(T0), 1);
        s.check_invariants(T0);
        // The owner comes back and gets its address.
        assert_eq!(dora(&mut s, 1, mac(11), T0 + 5), ip(11));
        assert_eq!(lease_of(&s, ip(11)).hostname, b"h");
        // The expired one is the first taken by a stranger; then the oldest grace.
        assert_eq!(dora(&mut s, 2, mac(100), T0 + 5), ip(12));
        assert_eq!(dora(&mut s, 3, mac(101), T0 + 5), ip(10));
        // After the grace, the owners of the rest still get them back if free.
        assert_eq!(s.free_count(T0 + 301), 1);
        assert_eq!(dora(&mut s, 4, mac(13), T0 + 400), ip(13));
        assert!(!s.take_dirty() || s.leases().count() == 4);
    }

    #[test]
    fn reservations() {
        let m = mac(7);
        let mut s =
            Server::new(ServerConfig { range: Some((ip(10), ip(11))), reservations: vec![(m, ip(5))], ..cfg() })
                .unwrap();
        assert_eq!(s.pool_size(), 2);
        assert_eq!(dora(&mut s, 1, m, T0), ip(5));
        s.connection_closed(1, T0);
        // Never given to anyone else, even when the pool is dry.
        dora(&mut s, 2, mac(2), T0);
        dora(&mut s, 3, mac(3), T0);
        assert!(s
            .handle(4, mac(4), true, &with(req(Discover, mac(4)), opt::REQUESTED_IP, &ip(5).octets()), T0 + 10)
            .is_none());
        assert_eq!(ty(&s.handle(4, mac(4), true, &init_reboot(mac(4), ip(5)), T0)), Some(Nak));
        // Its owner gets it after any time.
        assert_eq!(dora(&mut s, 5, m, T0 + 99_999), ip(5));
        // Declined: the owner gets a dynamic address meanwhile, and its own again afterwards.
        s.handle(5, m, true, &with(req(Decline, m), opt::REQUESTED_IP, &ip(5).octets()), T0 + 99_999);
        let dynamic = dora(&mut s, 5, m, T0 + 99_999); // the oldest expired lease, reclaimed
        assert_eq!(dynamic, ip(10));
        s.expire(T0 + 200_000);
        // An INIT-REBOOT for the dynamic address is refused once the reservation is usable again.
        assert_eq!(ty(&s.handle(5, m, true, &init_reboot(m, dynamic), T0 + 200_000)), Some(Nak));
        assert_eq!(dora(&mut s, 5, m, T0 + 200_000), ip(5));
        s.check_invariants(T0 + 200_000);
    }

    #[test]
    fn config_validation() {
        let bad = |c: ServerConfig| Server::new(c).err().unwrap();
        assert!(
            bad(ServerConfig { range: Some((ip(10), Ipv4Addr::new(192, 168, 3, 1))), ..cfg() }).contains("not inside")
        );
        assert!(bad(ServerConfig { range: Some((ip(20), ip(10))), ..cfg() }).contains("reversed"));
        assert!(bad(ServerConfig { reservations: vec![(mac(1), SERVER)], ..cfg() }).contains("reservation"));
        assert!(bad(ServerConfig { reservations: vec![(mac(1), ip(255))], ..cfg() }).contains("reservation"));
        assert!(bad(ServerConfig { reservations: vec![(mac(1), ip(9)), (mac(2), ip(9))], ..cfg() }).contains("twice"));
        assert!(bad(ServerConfig { server_ip: Ipv4Addr::new(10, 0, 0, 1), ..cfg() }).contains("not a host"));
        assert!(bad(ServerConfig { lease_time: 0, ..cfg() }).contains("lease time"));
        assert!(bad(ServerConfig { mtu: Some(67), ..cfg() }).contains("MTU"));
        assert!(bad(ServerConfig { range: Some((SERVER, SERVER)), ..cfg() }).contains("empty"));
        let slash30 = ServerConfig { subnet: "192.168.2.0/30".parse().unwrap(), router: ip(2), ..cfg() };
        assert!(bad(slash30.clone()).contains("empty"));
        assert_eq!(Server::new(ServerConfig { router: SERVER, ..slash30 }).unwrap().pool_size(), 1);
        // A range may include the network and broadcast addresses; they are never handed out.
        let s = Server::new(ServerConfig { range: Some((ip(0), ip(255))), ..cfg() }).unwrap();
        assert_eq!(s.pool_size(), 253);
    }

    // ---- random sequences ----

    /// An address in a random message: `None` is the one the server last offered or ACKed to
    /// this client (what a real client would send); `Some(n)` is 10.0.0.n, often wrong.
    type Addr = Option<u8>;

    #[derive(Debug, Clone)]
    enum Op {
        Discover {
            slot: u8,
            key: u8,
            want: Option<Addr>,
        },
        Select {
            slot: u8,
            key: u8,
            ip: Addr,
            ours: bool,
        },
        InitReboot {
            slot: u8,
            key: u8,
            ip: Addr,
        },
        Renew {
            slot: u8,
            key: u8,
            ip: Addr,
            broadcast: bool,
        },
        Decline {
            slot: u8,
            key: u8,
            ip: Addr,
        },
        Release {
            slot: u8,
            key: u8,
            ip: Addr,
        },
        Inform {
            slot: u8,
            key: u8,
            ip: Addr,
        },
        Close {
            slot: u8,
        },
        Wait {
            secs: u8,
        },
        /// Frames from `ip` with the key's MAC and no DHCP (a reconnect).
        Adopt {
            slot: u8,
            key: u8,
            ip: Addr,
        },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        // Client `key` talks on connection slot `key % 8`, sometimes on another one.
        let who =
            (0u8..10, prop::option::weighted(0.05, 0u8..8)).prop_map(|(key, other)| (other.unwrap_or(key % 8), key));
        let ip = prop::option::weighted(0.2, 0u8..40);
        prop_oneof![
            5 => (who.clone(), prop::option::weighted(0.3, ip.clone())).prop_map(|((slot, key), want)| Op::Discover { slot, key, want }),
            5 => (who.clone(), ip.clone(), prop::bool::weighted(0.9)).prop_map(|((slot, key), ip, ours)| Op::Select { slot, key, ip, ours }),
            2 => (who.clone(), ip.clone()).prop_map(|((slot, key), ip)| Op::InitReboot { slot, key, ip }),
            2 => (who.clone(), ip.clone(), any::<bool>()).prop_map(|((slot, key), ip, broadcast)| Op::Renew { slot, key, ip, broadcast }),
            1 => (who.clone(), ip.clone()).prop_map(|((slot, key), ip)| Op::Decline { slot, key, ip }),
            1 => (who.clone(), ip.clone()).prop_map(|((slot, key), ip)| Op::Release { slot, key, ip }),
            1 => (who.clone(), ip.clone()).prop_map(|((slot, key), ip)| Op::Inform { slot, key, ip }),
            1 => (0u8..8).prop_map(|slot| Op::Close { slot }),
            1 => (0u8..30).prop_map(|secs| Op::Wait { secs }),
            3 => (who.clone(), ip.clone()).prop_map(|((slot, key), ip)| Op::Adopt { slot, key, ip }),
        ]
    }

    /// What a client believes after an ACK.
    struct Belief {
        key: u8,
        conn: ConnId,
        expires: u64,
    }

    /// Counts of what a run did, to check that the generator reaches the interesting paths.
    #[derive(Default, Debug)]
    struct Seen {
        acks: usize,
        naks: usize,
        adopts: usize,
        dry: usize,
        reclaims: usize,
    }

    /// Every answer of `bound_ip` and `held_by_other` at `now` for the live connections
    /// `conns` and every address of 10.0.0.0/27.
    fn answers(s: &Server, conns: &[ConnId], now: u64) -> Vec<Option<Ipv4Addr>> {
        let mut v = Vec::new();
        for &c in conns {
            v.push(s.bound_ip(c, now));
            v.extend(
                (0..32u8).map(|n| s.held_by_other(Ipv4Addr::new(10, 0, 0, n), c, now).then_some(Ipv4Addr::UNSPECIFIED)),
            );
        }
        v
    }

    fn run(ops: Vec<Op>, seen: &mut Seen) {
        let net = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        let mut s = Server::new(ServerConfig {
            server_ip: net(1),
            subnet: "10.0.0.0/27".parse().unwrap(),
            router: net(1),
            dns: vec![],
            domain_name: None,
            mtu: None,
            lease_time: 100,
            range: Some((net(2), net(5))),
            reservations: vec![(mac(0), net(20))],
            grace: 50,
            quarantine: 30,
            offer_timeout: 60,
        })
        .unwrap();
        let mut now = T0;
        let mut gens = [0u64; 8];
        let mut beliefs: HashMap<Ipv4Addr, Belief> = HashMap::new();
        let mut last: HashMap<u8, Ipv4Addr> = HashMap::new();
        let mut dead: HashSet<ConnId> = HashSet::new();
        for op in ops {
            // An operation that leaves the epoch alone must leave every cached answer true, at
            // the time after it (a Wait runs `expire`, as the relay does once a second).
            let conns: Vec<ConnId> = (0..8u64).map(|slot| slot * 1_000_000 + gens[slot as usize]).collect();
            let before = (s.epoch(), answers(&s, &conns, now));
            let check = |s: &Server, now: u64| {
                if s.epoch() == before.0 {
                    assert_eq!(answers(s, &conns, now), before.1, "{op:?} changed an answer but not the epoch");
                }
            };
            let addr = |key: u8, a: Addr| match a {
                Some(n) => net(n),
                None => last.get(&key).copied().unwrap_or(net(2)),
            };
            let (slot, key, msg) = match op {
                Op::Wait { secs } => {
                    now += u64::from(secs);
                    s.expire(now);
                    s.check_invariants(now);
                    check(&s, now);
                    continue;
                }
                Op::Adopt { slot, key, ip } => {
                    let conn = u64::from(slot) * 1_000_000 + gens[slot as usize];
                    let a = addr(key, ip);
                    if s.adopt(conn, mac(key.into()), a, now) {
                        seen.adopts += 1;
                        // Its lease again (it may have forgotten it with a DISCOVER since).
                        let expires = lease_of(&s, a).expires;
                        if let Some(b) = beliefs.get(&a) {
                            let live = !dead.contains(&b.conn) && b.expires >= now;
                            assert!(!live || b.key == key, "{a} adopted by key {key} while key {} holds it", b.key);
                        }
                        beliefs.retain(|_, b| b.key != key);
                        beliefs.insert(a, Belief { key, conn, expires });
                    }
                    s.check_invariants(now);
                    check(&s, now);
                    continue;
                }
                Op::Close { slot } => {
                    let conn = u64::from(slot) * 1_000_000 + gens[slot as usize];
                    s.connection_closed(conn, now);
                    dead.insert(conn);
                    gens[slot as usize] += 1;
                    s.check_invariants(now);
                    check(&s, now);
                    continue;
                }
                Op::Discover { slot, key, want } => {
                    let m = req(Discover, mac(key.into()));
                    (
                        slot,
                        key,
                        match want {
                            Some(w) => with(m, opt::REQUESTED_IP, &addr(key, w).octets()),
                            None => m,
                        },
                    )
                }
                Op::Select { slot, key, ip, ours } => {
                    let sid = if ours { net(1) } else { net(30) };
                    (slot, key, selecting(mac(key.into()), addr(key, ip), sid))
                }
                Op::InitReboot { slot, key, ip } => (slot, key, init_reboot(mac(key.into()), addr(key, ip))),
                Op::Renew { slot, key, ip, .. } => (slot, key, renew(mac(key.into()), addr(key, ip))),
                Op::Decline { slot, key, ip } => {
                    (slot, key, with(req(Decline, mac(key.into())), opt::REQUESTED_IP, &addr(key, ip).octets()))
                }
                Op::Release { slot, key, ip } => {
                    (slot, key, Message { ciaddr: addr(key, ip), ..req(Release, mac(key.into())) })
                }
                Op::Inform { slot, key, ip } => {
                    (slot, key, Message { ciaddr: addr(key, ip), ..req(Inform, mac(key.into())) })
                }
            };
            // Keys 5.. send a client identifier as well.
            let msg = if key >= 5 { with(msg, opt::CLIENT_ID, &[0xff, key]) } else { msg };
            let conn = u64::from(slot) * 1_000_000 + gens[slot as usize];
            let broadcast = !matches!(op, Op::Renew { broadcast: false, .. });
            let unused_before = s.lowest_unused(&[]).is_none();
            let reply = s.handle(conn, mac(key.into()), broadcast, &msg, now);
            s.check_invariants(now);
            check(&s, now);
            let ty = msg.message_type().unwrap();
            if ty == Discover && reply.is_none() {
                seen.dry += 1;
            }
            // What the clients believe now.
            if matches!(ty, Discover | Request) {
                // The connection gives up what it held under other keys; a DISCOVERing client has no lease.
                beliefs.retain(|_, b| if b.key == key { ty != Discover } else { b.conn != conn });
            }
            if let Some(r) = &reply {
                let rt = r.msg.message_type().unwrap();
                if rt == Nak {
                    seen.naks += 1;
                    beliefs.retain(|_, b| b.key != key);
                }
                if matches!(rt, Offer | Ack) && ty != Inform {
                    let a = r.msg.yiaddr;
                    last.insert(key, a);
                    assert!(a == net(20) || (net(2)..=net(5)).contains(&a), "{a} handed out");
                    if a == net(20) {
                        assert_eq!(key, 0, "the reserved address went to another client");
                    }
                    if let Some(b) = beliefs.get(&a) {
                        let live = !dead.contains(&b.conn) && b.expires >= now;
                        assert!(!live || b.key == key, "{a} given to key {key} while key {} holds it", b.key);
                        seen.reclaims += usize::from(b.key != key && unused_before);
                    }
                    if rt == Ack {
                        seen.acks += 1;
                        beliefs.retain(|_, b| b.key != key);
                        beliefs.insert(a, Belief { key, conn, expires: now + 100 });
                    }
                }
            } else if matches!(ty, Release | Decline) {
                let a = if ty == Release { msg.ciaddr } else { msg.requested_ip().unwrap() };
                if beliefs.get(&a).is_some_and(|b| b.key == key) {
                    beliefs.remove(&a);
                }
            }
        }
    }

    #[test]
    fn random_sequences_reach_every_path() {
        // The generator must produce ACKs, NAKs, reclaims and a dry pool, or the property below
        // proves little. A fixed seed keeps this deterministic.
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = prop::collection::vec(arb_op(), 1..200);
        let mut seen = Seen::default();
        for _ in 0..100 {
            run(strategy.new_tree(&mut runner).unwrap().current(), &mut seen);
        }
        assert!(
            seen.acks > 500 && seen.naks > 100 && seen.dry > 20 && seen.reclaims > 10 && seen.adopts > 5,
            "{seen:?}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn random_sequences_never_double_book(ops in prop::collection::vec(arb_op(), 1..200)) {
            run(ops, &mut Seen::default());
        }
    }
}
