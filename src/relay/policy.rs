//! The relay's look at each frame a client sends, before it reaches the TAP: anti-spoofing
//! (a connection is locked to its first unicast source MAC and, once DHCP bound it an
//! address, to that address — in IPv4 and in ARP), then DHCP: a request to us is answered
//! in-line on the same WebSocket, so no other client ever sees it. Everything else goes on.
//! Glue between the pipe and the pure DHCP engine; it also keeps the lease file in step.
//!
//! One per worker; what must be global (the DHCP engine, the MAC and connection maps) is in
//! [`Shared`], behind its lock, which an ordinary frame of a known client never takes: the MAC
//! lock, the DHCP address and the verdict on a lease-less client's source address are cached
//! in its [`ConnState`] against the DHCP engine's epoch, read without the lock.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::pipe::{ConnState, Inspector, Verdict};
use super::shared::{ConnInfo, Shared};
use crate::dhcp::{server::Reply, wire};
use crate::wire::{ethernet, ipv4, udp, Mac};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// DHCP messages to us per connection per second, at most; more are dropped (`dhcp_flood`).
/// A client sends two to four per exchange; tests and tools that drive DHCP by hand stay well
/// under it.
pub const DHCP_PER_SECOND: u32 = 128;

/// A DHCP message to a server, found in a client's frame.
#[derive(Debug, PartialEq, Eq)]
pub struct DhcpRequest<'a> {
    pub src_mac: Mac,
    /// Sent to 255.255.255.255 (rather than unicast to the server).
    pub broadcast: bool,
    pub payload: &'a [u8],
}

/// Is `frame` a DHCP message for the server at `server_ip` (broadcast, or unicast to it)?
pub fn dhcp_request(frame: &[u8], server_ip: Ipv4Addr) -> Option<DhcpRequest<'_>> {
    let eth = ethernet::Frame::parse(frame)?;
    if eth.ethertype() != ethernet::ETHERTYPE_IPV4 {
        return None;
    }
    let ip = ipv4::Packet::parse(eth.payload())?;
    if ip.protocol() != ipv4::PROTO_UDP || ip.is_fragment() {
        return None;
    }
    let broadcast = ip.dst() == Ipv4Addr::BROADCAST;
    if !broadcast && ip.dst() != server_ip {
        return None;
    }
    let u = udp::Datagram::parse(ip.payload())?;
    if u.dst_port() != DHCP_SERVER_PORT || u.src_port() != DHCP_CLIENT_PORT {
        return None;
    }
    if !ip.header_valid() || !u.checksum_valid(ip.src(), ip.dst()) {
        return None;
    }
    Some(DhcpRequest { src_mac: eth.src(), broadcast, payload: u.payload() })
}

/// The DHCP engine's clock, in seconds: the wall clock read once (at the first call, while the
/// lease file is loaded), advanced since by `CLOCK_BOOTTIME` (which counts a suspend, and is
/// never set). A step of the wall clock (NTP at boot on a machine without a real-time clock, a
/// VM resumed, `date -s`) then neither ends every lease at once nor stretches quarantines and
/// grace periods. The lease file holds wall-clock times: [`to_wall`] and [`from_wall`] convert.
pub fn unix_now() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    let (wall, boot) = *ANCHOR.get_or_init(|| (wall_now(), boottime()));
    wall + boottime().saturating_sub(boot)
}

/// The wall clock, in unix seconds.
pub fn wall_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn boottime() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64
}

/// Engine time `t` as wall-clock time, given both clocks now: what the lease file stores, so
/// that the next start (whose engine clock begins at its wall clock) reads the time left.
pub fn to_wall(t: u64, engine_now: u64, wall_now: u64) -> u64 {
    (t + wall_now).saturating_sub(engine_now)
}

/// Wall-clock time `t` (from the lease file) as engine time.
pub fn from_wall(t: u64, engine_now: u64, wall_now: u64) -> u64 {
    (t + engine_now).saturating_sub(wall_now)
}

/// The built-in DHCP service as one worker sees it: the server's address and MAC (replies
/// come from them) and the buffers replies are built in. The engine itself is shared
/// ([`super::shared::State::dhcp`]).
pub struct Dhcp {
    pub server_ip: Ipv4Addr,
    pub server_mac: Mac,
    frame: Vec<u8>,
    payload: Vec<u8>,
}

impl Dhcp {
    pub fn new(server_ip: Ipv4Addr, server_mac: Mac) -> Dhcp {
        Dhcp { server_ip, server_mac, frame: Vec::with_capacity(1024), payload: Vec::with_capacity(600) }
    }

    /// `reply` as an Ethernet frame from the server.
    fn frame(&mut self, reply: &Reply) -> &[u8] {
        self.payload.clear();
        wire::encode(&reply.msg, &mut self.payload);
        self.frame.clear();
        ethernet::write_header(&mut self.frame, reply.dst_mac, self.server_mac, ethernet::ETHERTYPE_IPV4);
        udp::write_ipv4_udp(
            &mut self.frame,
            (self.server_ip, DHCP_SERVER_PORT),
            (reply.dst_ip, DHCP_CLIENT_PORT),
            &self.payload,
        );
        &self.frame
    }
}

/// Why a frame was refused (counter labels).
pub mod drop_reason {
    pub const SRC_MAC_MULTICAST: &str = "source MAC is multicast";
    pub const SRC_MAC_CHANGED: &str = "source MAC differs from the connection's";
    pub const MAC_IN_USE: &str = "source MAC belongs to another client";
    pub const SRC_IP_SPOOFED: &str = "IPv4 source is not the client's address";
    pub const ARP_SPOOFED: &str = "ARP claims an address or MAC not the client's";
    pub const VLAN_TAGGED: &str = "VLAN-tagged frame";
    pub const DHCP_SPOOFED: &str = "DHCP for another client's MAC or lease";
    pub const DHCP_FLOOD: &str = "DHCP messages over the per-connection rate";
    pub const ALL: [&str; 8] = [
        SRC_MAC_MULTICAST,
        SRC_MAC_CHANGED,
        MAC_IN_USE,
        SRC_IP_SPOOFED,
        ARP_SPOOFED,
        VLAN_TAGGED,
        DHCP_SPOOFED,
        DHCP_FLOOD,
    ];
    /// Metric labels, in the order of `ALL`.
    pub const LABELS: [&str; 8] = [
        "src_mac_multicast",
        "src_mac_changed",
        "mac_in_use",
        "src_ip_spoofed",
        "arp_spoofed",
        "vlan_tagged",
        "dhcp_spoofed",
        "dhcp_flood",
    ];
}

/// A connection claimed a MAC that an older connection of the same client holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takeover {
    pub old: u64,
    /// The worker that owns `old`.
    pub old_worker: usize,
    pub new: u64,
    pub mac: Mac,
}

/// Per-frame decisions for one worker.
pub struct Policy {
    shared: Arc<Shared>,
    /// This worker's index.
    me: usize,
    pub dhcp: Option<Dhcp>,
    pub anti_spoofing: bool,
    /// A newer connection of the same client claimed an old one's MAC. The relay closes the
    /// old one if it has gone silent, else the new one.
    pub takeovers: Vec<Takeover>,
    /// Frames dropped, by reason (index into `drop_reason::ALL`).
    pub drops: [u64; 8],
    /// DHCP messages from clients by type (index: the message type, 1..=8; 0: other).
    pub dhcp_messages: [u64; 9],
}

impl Policy {
    pub fn new(shared: Arc<Shared>, me: usize, dhcp: Option<Dhcp>, anti_spoofing: bool) -> Policy {
        Policy { shared, me, dhcp, anti_spoofing, takeovers: Vec::new(), drops: [0; 8], dhcp_messages: [0; 9] }
    }

    /// A client connected from `ip`.
    pub fn opened(&mut self, conn: u64, ip: IpAddr) {
        self.shared.lock().conns.insert(conn, ConnInfo { ip, worker: self.me });
    }

    /// A takeover was refused (the old connection is active): `mac` stays `owner`'s.
    pub fn restore_owner(&mut self, mac: Mac, owner: u64) {
        self.shared.lock().mac_owner.insert(mac, owner);
    }

    /// A client's connection ended: it leaves the maps and the admission counts (`ip`: its
    /// client address), its lease enters the grace period.
    pub fn closed(&mut self, conn: u64, ip: IpAddr, state: &ConnState) {
        let mut s = self.shared.lock();
        s.conns.remove(&conn);
        s.release(ip);
        if let Some(mac) = state.mac {
            if s.mac_owner.get(&mac) == Some(&conn) {
                s.mac_owner.remove(&mac);
            }
        }
        if let Some(d) = &mut s.dhcp {
            d.connection_closed(conn, unix_now());
        }
    }

    /// Once a second.
    pub fn tick(&mut self) {
        if self.dhcp.is_some() {
            if let Some(d) = &mut self.shared.lock().dhcp {
                d.expire(unix_now());
            }
        }
    }

    fn drop(&mut self, why: &'static str) -> Verdict<'static> {
        if let Some(i) = drop_reason::ALL.iter().position(|r| *r == why) {
            self.drops[i] += 1;
        }
        Verdict::Drop(why)
    }

    /// May connection `conn`, without a DHCP address, use `a` as its source? Its own lease from
    /// an earlier connection it takes up ([`Server::adopt`]). Otherwise not the bridge's,
    /// the router's, a DNS server's on the subnet, the subnet's network or broadcast address,
    /// one reserved for another MAC, nor one bound to another client — asked of the engine only
    /// when `a` or the epoch differs from the last frame's.
    fn may_claim_unbound(&self, conn: u64, st: &mut ConnState, a: Ipv4Addr) -> bool {
        let Some(d) = &self.dhcp else { return true };
        if a == d.server_ip {
            return false;
        }
        let epoch = self.shared.epoch();
        if let Some((ip, e, ok)) = st.claim {
            if ip == a && e == epoch {
                return ok;
            }
        }
        let mut s = self.shared.lock();
        let now = unix_now();
        if let (Some(d), Some(mac)) = (s.dhcp.as_mut(), st.mac) {
            // Its own lease, which no live connection holds: a reconnect, or a relay restart,
            // without a new DHCP exchange. This connection takes it up.
            if d.adopt(conn, mac, a, now) {
                st.ip = Some(a);
                st.epoch = Some(d.epoch());
                st.claim = None;
                return true;
            }
        }
        let ok = !s.dhcp.as_ref().is_some_and(|d| d.off_limits(a, st.mac) || d.held_by_other(a, conn, now));
        st.claim = Some((a, s.dhcp.as_ref().map_or(epoch, |d| d.epoch()), ok));
        ok
    }

    /// May this connection use `a` as a source address? Its DHCP address if it has one;
    /// without one, anything but the gateway's and addresses bound to other clients.
    fn may_claim(&self, conn: u64, st: &mut ConnState, a: Ipv4Addr) -> bool {
        match st.ip {
            Some(ip) => a == ip,
            None => self.may_claim_unbound(conn, st, a),
        }
    }

    /// Anti-spoofing: Err(reason) if the frame must not pass.
    fn guard(&mut self, conn: u64, st: &mut ConnState, frame: &[u8]) -> Result<(), &'static str> {
        let eth = ethernet::Frame::parse(frame).ok_or(drop_reason::SRC_MAC_CHANGED)?;
        let src = eth.src();
        if ethernet::is_multicast(&src) {
            return Err(drop_reason::SRC_MAC_MULTICAST);
        }
        match st.mac {
            Some(m) if m != src => return Err(drop_reason::SRC_MAC_CHANGED),
            Some(_) => {}
            None => {
                let mut s = self.shared.lock();
                match s.mac_owner.get(&src).copied() {
                    Some(other) if other != conn => {
                        // The same MAC from the same client: a reconnect whose old socket has not
                        // timed out yet — if the old one has gone silent (the relay checks, on
                        // the old one's worker). From anyone else it is a spoofing attempt.
                        if !s.same_client(other, conn) {
                            return Err(drop_reason::MAC_IN_USE);
                        }
                        let old_worker = s.conns.get(&other).map_or(self.me, |c| c.worker);
                        self.takeovers.push(Takeover { old: other, old_worker, new: conn, mac: src });
                    }
                    _ => {}
                }
                s.mac_owner.insert(src, conn);
                st.mac = Some(src);
            }
        }
        if self.dhcp.is_some() && st.epoch != Some(self.shared.epoch()) {
            let s = self.shared.lock();
            if let Some(d) = &s.dhcp {
                st.ip = d.bound_ip(conn, unix_now());
                st.epoch = Some(d.epoch());
            }
        }
        match eth.ethertype() {
            ethernet::ETHERTYPE_ARP => {
                let p = eth.payload();
                if p.len() < 28 {
                    return Ok(()); // not an Ethernet/IPv4 ARP; nothing to claim
                }
                let sha = &p[8..14];
                let spa = Ipv4Addr::new(p[14], p[15], p[16], p[17]);
                if sha != src || !(spa.is_unspecified() || self.may_claim(conn, st, spa)) {
                    return Err(drop_reason::ARP_SPOOFED);
                }
            }
            ethernet::ETHERTYPE_IPV4 => match ipv4::Packet::parse(eth.payload()) {
                Some(pkt) => {
                    // A DHCP message to the built-in server is answered here and never forwarded,
                    // whatever its source: a RENEW from an address the client no longer holds
                    // must reach the engine to get its NAK. For an external server only a
                    // client without an address (0.0.0.0) passes. (Looked at only when the
                    // source is refused: an ordinary frame pays nothing for it.)
                    let dhcp = || match &self.dhcp {
                        Some(d) => dhcp_request(frame, d.server_ip).is_some(),
                        None => pkt.src().is_unspecified() && dhcp_request(frame, Ipv4Addr::BROADCAST).is_some(),
                    };
                    if !self.may_claim(conn, st, pkt.src()) && !dhcp() {
                        return Err(drop_reason::SRC_IP_SPOOFED);
                    }
                }
                None if st.ip.is_some() => return Err(drop_reason::SRC_IP_SPOOFED),
                None => {}
            },
            // 802.1Q, 802.1ad and the old QinQ tag: their payload would escape these checks.
            0x8100 | 0x88a8 | 0x9100 => return Err(drop_reason::VLAN_TAGGED),
            _ => {}
        }
        Ok(())
    }
}

impl Inspector for Policy {
    fn inspect(&mut self, conn: u64, st: &mut ConnState, frame: &[u8]) -> Verdict<'_> {
        if self.anti_spoofing {
            if let Err(why) = self.guard(conn, st, frame) {
                return self.drop(why);
            }
        }
        let Some(d) = &self.dhcp else { return Verdict::Forward };
        let Some(req) = dhcp_request(frame, d.server_ip) else { return Verdict::Forward };
        // A message that binds, renews or frees a lease moves the shared engine's epoch, after
        // which every client's next frame looks at the engine again under the lock: a
        // connection flooding REQUESTs would make that every frame, on every worker. A real
        // client sends a handful.
        let second = unix_now();
        if st.dhcp_window.0 != second {
            st.dhcp_window = (second, 0);
        }
        st.dhcp_window.1 += 1;
        if st.dhcp_window.1 > DHCP_PER_SECOND {
            return self.drop(drop_reason::DHCP_FLOOD);
        }
        let msg = match wire::decode(req.payload) {
            Ok(m) => m,
            Err(e) => {
                log::debug!("malformed DHCP message from {}: {e}", crate::sys::format_mac(&req.src_mac));
                return Verdict::Consume;
            }
        };
        self.dhcp_messages[msg.message_type().map_or(0, |t| t as usize)] += 1;
        let mut s = self.shared.lock();
        let Some(server) = &mut s.dhcp else { return Verdict::Forward };
        if self.anti_spoofing {
            // The DHCP fields name the client too: chaddr must be the connection's MAC, and a
            // lease held by another live connection may move only to the same client.
            let other = server.key_held_elsewhere(conn, &msg);
            if msg.client_mac() != st.mac || other.is_some_and(|o| !s.same_client(o, conn)) {
                drop(s);
                return self.drop(drop_reason::DHCP_SPOOFED);
            }
        }
        let Some(server) = &mut s.dhcp else { return Verdict::Forward };
        let reply = server.handle(conn, req.src_mac, req.broadcast, &msg, unix_now());
        drop(s);
        st.epoch = None; // the exchange may have bound or released an address
        st.claim = None;
        let Some(d) = &mut self.dhcp else { return Verdict::Forward };
        match reply {
            Some(r) => Verdict::Reply(d.frame(&r)),
            None => Verdict::Consume,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::server::{Server, ServerConfig};
    use std::sync::atomic::Ordering;

    fn frame(dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        ethernet::write_header(&mut f, [0xff; 6], [2, 0, 0, 0, 0, 9], ethernet::ETHERTYPE_IPV4);
        udp::write_ipv4_udp(&mut f, (Ipv4Addr::UNSPECIFIED, sport), (dst, dport), payload);
        f
    }

    #[test]
    fn recognises_dhcp_to_us_only() {
        let us = Ipv4Addr::new(192, 168, 2, 1);
        let f = frame(Ipv4Addr::BROADCAST, 68, 67, b"dhcp");
        assert_eq!(
            dhcp_request(&f, us),
            Some(DhcpRequest { src_mac: [2, 0, 0, 0, 0, 9], broadcast: true, payload: b"dhcp" })
        );
        assert!(dhcp_request(&frame(us, 68, 67, b"x"), us).is_some_and(|r| !r.broadcast));
        assert_eq!(dhcp_request(&frame(Ipv4Addr::new(10, 0, 0, 1), 68, 67, b"x"), us), None); // another server
        assert_eq!(dhcp_request(&frame(Ipv4Addr::BROADCAST, 1234, 67, b"x"), us), None);
        assert_eq!(dhcp_request(&frame(Ipv4Addr::BROADCAST, 68, 53, b"x"), us), None);
        let mut bad = frame(Ipv4Addr::BROADCAST, 68, 67, b"dhcp");
        let n = bad.len();
        bad[n - 1] ^= 0xff; // UDP checksum no longer matches
        assert_eq!(dhcp_request(&bad, us), None);
        assert_eq!(dhcp_request(&[0u8; 13], us), None);
    }

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

    /// A lease made before the wall clock was set (a machine booted without a real-time clock,
    /// the engine anchored at 1000 s) is written with the time it has left, and a later start
    /// reads it so; the engine clock itself never jumps with the wall clock.
    #[test]
    fn the_lease_file_holds_wall_time() {
        let (engine, wall) = (1_010, 90_010); // ten seconds in, after a step of the wall clock
        let expires = 1_000 + 3_600;
        let saved = to_wall(expires, engine, wall);
        assert_eq!(saved, 93_600);
        // The next start's engine clock begins at its wall clock.
        assert_eq!(from_wall(saved, 90_020, 90_020), 93_600);
        // Engine and wall clock apart in a run: there and back again.
        assert_eq!(from_wall(to_wall(expires, engine, wall), engine, wall), expires);
        assert_eq!(to_wall(5, 1_000, 0), 0, "saturates");
    }

    #[test]
    fn the_dhcp_clock_is_unix_time_that_only_moves_forward() {
        let wall = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let (a, w) = (unix_now(), wall());
        assert!(a.abs_diff(w) <= 2, "{a} against the wall clock's {w}");
        let mut last = a;
        for _ in 0..1000 {
            let t = unix_now();
            assert!(t >= last);
            last = t;
        }
    }

    /// A `Shared` for `workers` workers with a DHCP engine on 192.168.2.0/24; the Polls keep
    /// the wakers valid.
    fn shared(workers: usize) -> (Arc<Shared>, Vec<mio::Poll>) {
        shared_with(workers, ServerConfig::for_tests())
    }

    /// The same with the DHCP engine configured by `cfg`.
    fn shared_with(workers: usize, cfg: ServerConfig) -> (Arc<Shared>, Vec<mio::Poll>) {
        let polls: Vec<mio::Poll> = (0..=workers).map(|_| mio::Poll::new().unwrap()).collect();
        let mut wakers: Vec<mio::Waker> =
            polls.iter().map(|p| mio::Waker::new(p.registry(), mio::Token(0)).unwrap()).collect();
        let main = wakers.pop().unwrap();
        let server = Server::new(cfg).unwrap();
        (Arc::new(Shared::new(Some(server), None, wakers, main)), polls)
    }

    /// Without a lease a client may not take the router's address, an on-subnet DNS server's,
    /// the subnet's broadcast address, or one reserved for another MAC (its own it may).
    #[test]
    fn a_client_without_a_lease_takes_no_configured_address() {
        let at = |n| Ipv4Addr::new(192, 168, 2, n);
        let owner = [2, 0, 0, 0, 0, 7];
        let other = |n: u8| [2, 0, 0, 0, 1, n];
        let cfg = ServerConfig {
            router: at(254),
            dns: vec![at(253)],
            reservations: vec![(owner, at(5))],
            ..ServerConfig::for_tests()
        };
        let (sh, _poll) = shared_with(1, cfg);
        let mut p = policy(&sh, 0);
        let spoofed = Verdict::Drop(drop_reason::SRC_IP_SPOOFED);
        for (conn, a) in [(1, at(254)), (2, at(253)), (3, at(255)), (4, at(5)), (5, at(1))] {
            p.opened(conn, "203.0.113.1".parse().unwrap());
            assert_eq!(p.inspect(conn, &mut ConnState::default(), &udp_from(other(conn as u8), a)), spoofed, "{a}");
        }
        p.opened(6, "203.0.113.1".parse().unwrap());
        assert_eq!(p.inspect(6, &mut ConnState::default(), &udp_from(owner, at(5))), Verdict::Forward);
        p.opened(7, "203.0.113.1".parse().unwrap());
        assert_eq!(p.inspect(7, &mut ConnState::default(), &udp_from(other(7), at(50))), Verdict::Forward);
    }

    /// A guest whose connection came back (or whose relay restarted) goes on with its address
    /// without a new DHCP exchange: its first frame takes the lease up again, and no one else
    /// may use it.
    #[test]
    fn a_reconnect_without_dhcp_takes_its_lease_up() {
        let (sh, _poll) = shared(1);
        let mut p = policy(&sh, 0);
        let m = [2, 0, 0, 0, 0, 21];
        p.opened(1, "203.0.113.1".parse().unwrap());
        let mut st = ConnState::default();
        let v = yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 1, None)));
        assert_eq!(yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 3, Some(v)))), v);
        sh.lock().dhcp.as_mut().unwrap().connection_closed(1, unix_now());
        p.opened(2, "203.0.113.1".parse().unwrap());
        let mut st2 = ConnState::default();
        assert_eq!(p.inspect(2, &mut st2, &udp_from(m, v)), Verdict::Forward);
        assert_eq!(sh.lock().dhcp.as_ref().unwrap().bound_ip(2, unix_now()), Some(v));
        // Another client may not use it, nor get it.
        p.opened(3, "203.0.113.3".parse().unwrap());
        let m3 = [2, 0, 0, 0, 0, 22];
        let mut st3 = ConnState::default();
        assert_ne!(yiaddr(p.inspect(3, &mut st3, &dhcp_from(m3, 1, Some(v)))), v);
        assert_eq!(
            p.inspect(3, &mut ConnState::default(), &udp_from(m3, v)),
            Verdict::Drop(drop_reason::SRC_IP_SPOOFED)
        );
        assert_eq!(p.inspect(2, &mut st2, &udp_from(m, v)), Verdict::Forward);
    }

    /// A RENEW sent from an address the client no longer holds (another's now) gets its NAK:
    /// the source check does not drop DHCP to the built-in server, which never forwards it.
    #[test]
    fn a_renew_from_an_address_now_anothers_is_nakked() {
        let (sh, _poll) = shared(1);
        let mut p = policy(&sh, 0);
        let (m1, m2) = ([2, 0, 0, 0, 0, 31], [2, 0, 0, 0, 0, 32]);
        p.opened(1, "203.0.113.1".parse().unwrap());
        let mut st = ConnState::default();
        let v = yiaddr(p.inspect(1, &mut st, &dhcp_from(m1, 1, None)));
        assert_eq!(yiaddr(p.inspect(1, &mut st, &dhcp_from(m1, 3, Some(v)))), v);
        p.opened(2, "203.0.113.2".parse().unwrap());
        let m = wire::Message { ciaddr: v, ..dhcp_message(m2, 3) };
        let f = dhcp_frame(&m, m2, [2, 0, 0, 0, 0, 1], (v, GW));
        let Verdict::Reply(r) = p.inspect(2, &mut ConnState::default(), &f) else { panic!("no answer") };
        assert_eq!(wire::decode(&r[14 + 20 + 8..]).unwrap().message_type(), Some(wire::MessageType::Nak));
        // Other traffic from that address is still refused.
        assert_eq!(
            p.inspect(2, &mut ConnState::default(), &udp_from(m2, v)),
            Verdict::Drop(drop_reason::SRC_IP_SPOOFED)
        );
    }

    fn policy(shared: &Arc<Shared>, worker: usize) -> Policy {
        Policy::new(shared.clone(), worker, Some(Dhcp::new(GW, [2, 0, 0, 0, 0, 1])), true)
    }

    /// A UDP frame from `mac`, `src`:1000 to 198.51.100.1:2000.
    fn udp_from(mac: Mac, src: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        ethernet::write_header(&mut f, [2, 0, 0, 0, 0, 1], mac, ethernet::ETHERTYPE_IPV4);
        udp::write_ipv4_udp(&mut f, (src, 1000), (Ipv4Addr::new(198, 51, 100, 1), 2000), b"data");
        f
    }

    /// A DHCP message of type `ty` from `mac` (broadcast, from 0.0.0.0).
    fn dhcp_from(mac: Mac, ty: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut m = dhcp_message(mac, ty);
        if let Some(ip) = requested {
            m.set_option(wire::opt::REQUESTED_IP, ip.octets());
            m.set_option(wire::opt::SERVER_ID, GW.octets());
        }
        dhcp_frame(&m, mac, [0xff; 6], (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST))
    }

    /// A BOOTREQUEST of type `ty` from `mac` (as chaddr).
    fn dhcp_message(mac: Mac, ty: u8) -> wire::Message {
        let mut chaddr = [0; 16];
        chaddr[..6].copy_from_slice(&mac);
        let mut m = wire::Message { op: 1, htype: 1, hlen: 6, xid: 7, chaddr, ..Default::default() };
        m.set_option(wire::opt::MESSAGE_TYPE, [ty]);
        m
    }

    /// `m` in a frame from `mac` to `dst_mac`, UDP 68→67 between `ips` (source, destination).
    fn dhcp_frame(m: &wire::Message, mac: Mac, dst_mac: Mac, ips: (Ipv4Addr, Ipv4Addr)) -> Vec<u8> {
        let mut payload = Vec::new();
        wire::encode(m, &mut payload);
        let mut f = Vec::new();
        ethernet::write_header(&mut f, dst_mac, mac, ethernet::ETHERTYPE_IPV4);
        udp::write_ipv4_udp(&mut f, (ips.0, 68), (ips.1, 67), &payload);
        f
    }

    /// The address a DHCP reply frame offers or acknowledges.
    fn yiaddr(v: Verdict) -> Ipv4Addr {
        let Verdict::Reply(f) = v else { panic!("no reply: {v:?}") };
        wire::decode(&f[14 + 20 + 8..]).unwrap().yiaddr
    }

    #[test]
    fn ordinary_frames_take_no_lock() {
        let (sh, _poll) = shared(1);
        let mut p = policy(&sh, 0);
        let m = [2, 0, 0, 0, 0, 9];
        p.opened(1, "203.0.113.1".parse().unwrap());
        let mut st = ConnState::default();
        let locks = || sh.locks.load(Ordering::Relaxed);

        // Without a lease: the first frame locks the MAC and judges the address; the rest
        // are judged from the cache.
        let any = Ipv4Addr::new(192, 168, 2, 50);
        assert_eq!(p.inspect(1, &mut st, &udp_from(m, any)), Verdict::Forward);
        let n = locks();
        for _ in 0..10 {
            assert_eq!(p.inspect(1, &mut st, &udp_from(m, any)), Verdict::Forward);
        }
        assert_eq!(locks(), n, "a lease-less client's frames took the lock");

        // With a lease: after the exchange, one look at the engine, then none.
        let offered = yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 1, None)));
        assert_eq!(yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 3, Some(offered)))), offered);
        assert_eq!(p.inspect(1, &mut st, &udp_from(m, offered)), Verdict::Forward);
        let n = locks();
        for _ in 0..10 {
            assert_eq!(p.inspect(1, &mut st, &udp_from(m, offered)), Verdict::Forward);
        }
        assert_eq!(locks(), n, "a leased client's frames took the lock");
        assert_eq!(p.inspect(1, &mut st, &udp_from(m, any)), Verdict::Drop(drop_reason::SRC_IP_SPOOFED));

        // Another worker's client may not use that address; its verdict is cached too, until
        // the engine changes.
        let mut q = policy(&sh, 0);
        q.opened(2, "203.0.113.2".parse().unwrap());
        let mut st2 = ConnState::default();
        let m2 = [2, 0, 0, 0, 0, 10];
        let spoof = drop_reason::SRC_IP_SPOOFED;
        assert_eq!(q.inspect(2, &mut st2, &udp_from(m2, offered)), Verdict::Drop(spoof));
        let n = locks();
        assert_eq!(q.inspect(2, &mut st2, &udp_from(m2, offered)), Verdict::Drop(spoof));
        assert_eq!(locks(), n);
        // The holder leaves (it was admitted, as every connection is): the epoch moves, and
        // the address is free once its grace period is over.
        let req = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let crate::ws::handshake::Outcome::Upgrade(up) = crate::ws::handshake::parse_request(req) else { panic!() };
        let adm = crate::admission::Admission { max_clients: 9, max_per_ip: 9, ..Default::default() };
        let client = "203.0.113.1".parse().unwrap();
        sh.lock().admit(&adm, &up, client).unwrap();
        p.closed(1, client, &st);
        sh.lock().dhcp.as_mut().unwrap().expire(unix_now() + 301);
        assert_eq!(q.inspect(2, &mut st2, &udp_from(m2, offered)), Verdict::Forward);
    }

    #[test]
    fn a_dhcp_flood_is_cut_to_the_per_second_rate() {
        let (sh, _poll) = shared(1);
        let mut p = policy(&sh, 0);
        let m = [2, 0, 0, 0, 0, 11];
        p.opened(1, "203.0.113.1".parse().unwrap());
        let mut st = ConnState::default();
        let discover = dhcp_from(m, 1, None);
        let n = 4 * DHCP_PER_SECOND as usize;
        let mut answered = 0;
        for _ in 0..n {
            match p.inspect(1, &mut st, &discover) {
                Verdict::Reply(_) => answered += 1,
                Verdict::Drop(why) => assert_eq!(why, drop_reason::DHCP_FLOOD),
                v => panic!("{v:?}"),
            }
        }
        // The loop takes far less than a second, so it spans at most two windows.
        assert!(answered >= DHCP_PER_SECOND as usize && answered <= 2 * DHCP_PER_SECOND as usize, "{answered}");
        let flood = drop_reason::ALL.iter().position(|r| *r == drop_reason::DHCP_FLOOD).unwrap();
        assert_eq!(p.drops[flood] as usize, n - answered);
        // Another connection is not affected.
        let mut other = ConnState::default();
        p.opened(2, "203.0.113.2".parse().unwrap());
        assert!(matches!(p.inspect(2, &mut other, &dhcp_from([2, 0, 0, 0, 0, 12], 1, None)), Verdict::Reply(_)));
    }

    /// Offers do not move the epoch (no client's cached answer changes), an ACK does: a
    /// connection DISCOVERing in a loop sends no other client back to the lock.
    #[test]
    fn only_a_binding_moves_the_epoch() {
        let (sh, _poll) = shared(1);
        let mut p = policy(&sh, 0);
        let m = [2, 0, 0, 0, 0, 13];
        p.opened(1, "203.0.113.1".parse().unwrap());
        let mut st = ConnState::default();
        let before = sh.epoch();
        let mut offered = Ipv4Addr::UNSPECIFIED;
        for _ in 0..10 {
            offered = yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 1, None)));
        }
        assert_eq!(sh.epoch(), before, "ten DISCOVERs moved the epoch");
        assert_eq!(yiaddr(p.inspect(1, &mut st, &dhcp_from(m, 3, Some(offered)))), offered);
        assert_ne!(sh.epoch(), before, "the ACK must move the epoch");
    }

    #[test]
    fn mac_locks_span_workers() {
        let (sh, _poll) = shared(2);
        let (mut w0, mut w1) = (policy(&sh, 0), policy(&sh, 1));
        let m = [2, 0, 0, 0, 0, 9];
        let a = Ipv4Addr::new(192, 168, 2, 50);
        w1.opened(1, "203.0.113.1".parse().unwrap());
        w0.opened(2, "203.0.113.1".parse().unwrap()); // the same client, on worker 0
        w0.opened(3, "203.0.113.3".parse().unwrap()); // another client
        let (mut s1, mut s2, mut s3) = (ConnState::default(), ConnState::default(), ConnState::default());
        assert_eq!(w1.inspect(1, &mut s1, &udp_from(m, a)), Verdict::Forward);
        assert_eq!(w0.inspect(3, &mut s3, &udp_from(m, a)), Verdict::Drop(drop_reason::MAC_IN_USE));
        assert_eq!(w0.inspect(2, &mut s2, &udp_from(m, a)), Verdict::Forward);
        assert_eq!(w0.takeovers, [Takeover { old: 1, old_worker: 1, new: 2, mac: m }]);
        assert!(w1.takeovers.is_empty());
    }
}
