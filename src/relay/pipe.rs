//! A pipe between one established WebSocket and one TAP device: the socket, the TAP, the
//! WebSocket state, the buffers, and the two directions of the frame path between them.
//! The relay runs one per client (server role); `wsnic connect` runs one (client role, which
//! masks what it sends with a fresh random key per frame), so both follow the same rules.
//!
//! - WebSocket → TAP: socket bytes land in the input buffer; `ws::Conn` unmasks each complete
//!   frame in place; a binary frame goes to the TAP with one `write()`. If the TAP would
//!   block, the frame stays put and the socket is not read again until the TAP drains.
//! - TAP → WebSocket: each TAP `read()` lands straight in the output buffer behind room for
//!   the frame header; every ready frame leaves in one `write()` at the end of the pass. Over
//!   the high-water mark the TAP is not read, so the kernel's queue drops, as a real NIC does.
//! - With offload (`Tap::has_vnet_hdr`), a TAP read may be a super-frame, cut here into real
//!   frames (`offload::segment`), and a client's consecutive TCP segments are merged into one
//!   super-frame for the TAP (`offload::coalesce`), never held past the pass.
//!
//! Readiness is edge-triggered: the `*_ready` flags latch each fd's state until an operation
//! returns `WouldBlock`. Each pass moves at most [`BUDGET`] frames per direction, so one busy
//! client cannot starve the others; [`Progress::Again`] asks to be run again.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::bufpool::BufPool;
use super::shaper::Bucket;
use super::transport::Transport;
use crate::offload::coalesce::{Candidate, Coalescer, Push};
use crate::offload::segment;
use crate::offload::vnet::{self, VnetHdr};
use crate::sys::tap::{Tap, VNET_HDR_LEN};
use crate::ws::conn::close_payload;
use crate::ws::frame::{apply_mask, encode_header, header_len, Opcode, MAX_HEADER};
use crate::ws::{close_code, Conn, Item, Parsed, Payload, Role};

/// Frames moved per direction per pass before yielding to other clients.
pub const BUDGET: usize = 64;
/// Room always kept in the output buffer for one control frame (masked header + 125 bytes)
/// or one reply from the [`Inspector`] (a DHCP answer, under 1 KiB).
const CONTROL_ROOM: usize = 2048;
/// Largest reply an [`Inspector`] may send.
pub const MAX_REPLY: usize = CONTROL_ROOM - MAX_HEADER;

/// What happens to a frame that came from the WebSocket.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// On to the TAP.
    Forward,
    /// Answered in-line: this Ethernet frame (at most [`MAX_REPLY`] bytes) goes back on the same
    /// WebSocket, and the original goes nowhere.
    Reply(&'a [u8]),
    /// Consumed without an answer (a DHCP message that needs none).
    Consume,
    /// Refused by policy (spoofing); the label names the reason.
    Drop(&'static str),
}

/// What an inspector remembers about one connection (the relay's anti-spoofing locks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnState {
    /// The source MAC this connection is locked to.
    pub mac: Option<[u8; 6]>,
    /// The address DHCP bound to it, as of `epoch` of the DHCP engine.
    pub ip: Option<std::net::Ipv4Addr>,
    pub epoch: Option<u64>,
    /// Without a DHCP address: the last source address judged, the DHCP epoch of the verdict,
    /// and whether it may be used (not another client's), so a client without a lease does
    /// not ask the shared DHCP engine on every frame.
    pub claim: Option<(std::net::Ipv4Addr, u64, bool)>,
    /// DHCP messages to us in the current second (unix time, count): see `DHCP_PER_SECOND`
    /// in `relay::policy`.
    pub dhcp_window: (u64, u32),
}

/// Looks at every frame from a WebSocket before it reaches the TAP (the relay answers DHCP
/// here). `wsnic connect` uses [`PassThrough`].
pub trait Inspector {
    fn inspect(&mut self, conn: u64, state: &mut ConnState, frame: &[u8]) -> Verdict<'_>;
}

/// Forwards everything.
pub struct PassThrough;

impl Inspector for PassThrough {
    fn inspect(&mut self, _conn: u64, _state: &mut ConnState, _frame: &[u8]) -> Verdict<'_> {
        Verdict::Forward
    }
}
/// Room needed in the output buffer to read one frame from the TAP.
fn tap_read_room(max_frame: usize) -> usize {
    MAX_HEADER + max_frame + 1 + CONTROL_ROOM
}
/// Room needed in the output buffer for the frames cut from one super-frame of an offloading
/// TAP: its payload, and per segment (at most [`MAX_SEGMENTS`]) a copy of the headers (up to
/// 14 + 60 + 60 bytes) and a WebSocket header.
fn offload_room() -> usize {
    MAX_SUPER_FRAME + MAX_SEGMENTS * (134 + MAX_HEADER) + CONTROL_ROOM
}
/// Largest frame an offloading TAP hands over: an IPv4 packet of 65535 bytes behind its
/// Ethernet header (IPv6 without jumbograms is no larger).
pub const MAX_SUPER_FRAME: usize = 14 + 65535;
/// Segments per super-frame the output room is sized for: the relay sets the TAP's
/// `gso_max_segs` to this. Super-frames the kernel did not segment itself (forwarded from another
/// TAP or a VM) may have more; they are cut only if the output buffer has room.
pub const MAX_SEGMENTS: usize = 64;
/// Bytes of a read from an offloading TAP: the `virtio_net_hdr`, the largest super-frame, and
/// one byte more to tell a truncated read.
pub const OFFLOAD_READ: usize = VNET_HDR_LEN + MAX_SUPER_FRAME + 1;
/// Smallest Ethernet frame: destination, source, EtherType.
pub const MIN_FRAME: usize = 14;

/// Per-connection counters, reported when it closes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub to_tap_frames: u64,
    pub to_tap_bytes: u64,
    pub to_ws_frames: u64,
    pub to_ws_bytes: u64,
    /// Text messages (never frames in this protocol) dropped.
    pub drop_text: u64,
    /// Binary messages shorter than an Ethernet header dropped.
    pub drop_runt: u64,
    /// Frames the TAP refused (an error other than "would block"), or had not taken yet when
    /// the connection ended (a stalled frame, an offload batch not yet written).
    pub drop_tap_error: u64,
    /// Frames from the TAP larger than `max_frame_size` dropped.
    pub drop_oversize: u64,
    /// Frames answered or consumed by the inspector (DHCP) instead of going to the TAP.
    pub answered: u64,
    /// Frames refused by policy (spoofed source MAC or address, ARP poisoning).
    pub drop_policy: u64,
    /// Frames from an offloading TAP that could not be cut into real frames (malformed
    /// super-frame, a kind of segmentation we do not do, too many segments).
    pub drop_offload: u64,
}

impl Stats {
    /// Add `o`'s counters to these.
    pub fn add(&mut self, o: &Stats) {
        self.to_tap_frames += o.to_tap_frames;
        self.to_tap_bytes += o.to_tap_bytes;
        self.to_ws_frames += o.to_ws_frames;
        self.to_ws_bytes += o.to_ws_bytes;
        self.drop_text += o.drop_text;
        self.drop_runt += o.drop_runt;
        self.drop_tap_error += o.drop_tap_error;
        self.drop_oversize += o.drop_oversize;
        self.answered += o.answered;
        self.drop_policy += o.drop_policy;
        self.drop_offload += o.drop_offload;
    }

    pub fn drops(&self) -> u64 {
        self.drop_text
            + self.drop_runt
            + self.drop_tap_error
            + self.drop_oversize
            + self.drop_policy
            + self.drop_offload
    }
}

/// Why a connection ends; `code` is the Close code we send (None: the socket is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub reason: String,
    pub code: Option<u16>,
}

impl Ending {
    pub fn new(reason: impl Into<String>, code: Option<u16>) -> Ending {
        Ending { reason: reason.into(), code }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for readiness.
    Idle,
    /// Budget used up with work left: run again before sleeping.
    Again,
    /// Close the connection (after flushing what is queued).
    End(Ending),
}

/// The TAP side of a write, borrowed field by field so a frame in another buffer of the pipe
/// can be written.
struct TapIo<'a> {
    tap: &'a Tap,
    writable: &'a mut bool,
    failed: &'a mut Option<io::Error>,
}

/// What became of a write to the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    Yes,
    /// Refused for good (the caller counts it as dropped).
    Refused,
    /// Not now: the TAP would block, or failed (the connection ends).
    Blocked,
}

impl TapIo<'_> {
    /// Write one frame (behind `vnet` if given).
    fn write(&mut self, vnet: Option<&[u8; VNET_HDR_LEN]>, bytes: &[u8]) -> Wrote {
        let r = match vnet {
            Some(h) => self.tap.write_vnet(h, bytes),
            None => self.tap.write(bytes),
        };
        match r {
            Ok(_) => Wrote::Yes,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *self.writable = false;
                Wrote::Blocked
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBADFD | libc::EIO | libc::ENODEV | libc::ENXIO)) => {
                *self.failed = Some(e);
                Wrote::Blocked
            }
            Err(e) => {
                log::debug!("{} refused a frame of {} bytes: {e}", self.tap.name(), bytes.len());
                Wrote::Refused
            }
        }
    }
}

/// Account for a write of the staged batch: its frames are delivered or dropped, and the stage
/// is free again — unless the TAP would not take it (false: it stays staged).
fn batch_written(wrote: Wrote, stats: &mut Stats, staged: &mut usize, batch: &mut (u64, u64)) -> bool {
    match wrote {
        Wrote::Blocked => return false,
        Wrote::Yes => {
            stats.to_tap_frames += batch.0;
            stats.to_tap_bytes += batch.1;
        }
        Wrote::Refused => stats.drop_tap_error += batch.0,
    }
    *staged = 0;
    *batch = (0, 0);
    true
}

/// A frame already unmasked but not yet taken by the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stalled {
    None,
    /// `inb[start..end]`; the whole WebSocket frame is `consumed` bytes from `in_start`.
    InBuf {
        start: usize,
        end: usize,
        consumed: usize,
    },
    /// In `ws.assembled()`.
    Assembled {
        consumed: usize,
    },
}

pub struct Pipe {
    /// Unique for the life of the process (the DHCP server ties leases to it).
    pub id: u64,
    /// The WebSocket's byte stream: plain TCP or TLS.
    pub sock: Transport,
    pub tap: Tap,
    pub peer: SocketAddr,
    /// The client's address (the peer, or what a trusted proxy said).
    pub client_ip: std::net::IpAddr,
    pub state: ConnState,
    /// Rate shaping (WebSocket → TAP, TAP → WebSocket), when configured.
    shaper: Option<Box<[Bucket; 2]>>,
    /// Throttled until then: the event loop runs the pipe again at that time.
    pub wake_at: Option<Instant>,
    /// The TAP failed (device gone, I/O error): the connection must end.
    tap_failed: Option<io::Error>,
    pub connected_at: Instant,
    pub stats: Stats,
    pub sock_readable: bool,
    pub sock_writable: bool,
    pub tap_readable: bool,
    pub tap_writable: bool,
    /// Set once the connection is ending: only queued output is flushed.
    pub closing: Option<Instant>,
    /// The client sent its Close: it sends nothing more (RFC 6455 §5.5.1), so closing needs
    /// no lingering for its input.
    pub client_sent_close: bool,
    /// Why it is closing, while it lingers to flush.
    pub ending: Option<Ending>,
    ws: Conn,
    /// Client role only: the source of a fresh mask key per frame (RFC 6455 §5.3).
    masker: Option<Box<rand::rngs::StdRng>>,
    max_frame: usize,
    inb: Option<Box<[u8]>>,
    in_start: usize,
    in_end: usize,
    stalled: Stalled,
    outb: Option<Box<[u8]>>,
    out_start: usize,
    out_end: usize,
    /// Offload: the client's TCP segments being merged into one super-frame for the TAP
    /// (in `stage`, taken from the pool while a batch is open).
    gro: Coalescer,
    stage: Option<Box<[u8]>>,
    /// Offload: a finished super-frame (`stage[..staged]`) the TAP would not take yet.
    staged: usize,
    /// Offload: frames and bytes in the open or staged batch, counted once it is written.
    batch: (u64, u64),
    last_heard: Instant,
    ping_sent: bool,
    /// `stats.to_tap_frames` at the last [`Pipe::to_tap_since_tick`].
    to_tap_at_tick: u64,
}

impl Pipe {
    /// `role` is this end's: `Server` in the relay, `Client` in `wsnic connect`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        sock: Transport,
        tap: Tap,
        peer: SocketAddr,
        role: Role,
        max_frame: usize,
        now: Instant,
    ) -> Pipe {
        use rand::SeedableRng;
        Pipe {
            id,
            sock,
            tap,
            peer,
            client_ip: peer.ip(),
            state: ConnState::default(),
            shaper: None,
            wake_at: None,
            tap_failed: None,
            connected_at: now,
            stats: Stats::default(),
            sock_readable: true,
            sock_writable: true,
            tap_readable: true,
            tap_writable: true,
            closing: None,
            client_sent_close: false,
            ending: None,
            ws: Conn::new(role, max_frame),
            masker: (role == Role::Client).then(|| Box::new(rand::rngs::StdRng::from_os_rng())),
            max_frame,
            inb: None,
            in_start: 0,
            in_end: 0,
            stalled: Stalled::None,
            outb: None,
            out_start: 0,
            out_end: 0,
            gro: Coalescer::new(),
            stage: None,
            staged: 0,
            batch: (0, 0),
            last_heard: now,
            ping_sent: false,
            to_tap_at_tick: 0,
        }
    }

    /// Size of the pool's buffers for frames of up to `max_frame` bytes. With offload they are
    /// larger: one output buffer then takes the frames of about a dozen super-frames, so the
    /// socket gets fewer, larger writes (measured: relay CPU per GB toward the client 0.78 s with
    /// 256 KiB, 0.67 with 512 KiB, 0.61 with 1 MiB).
    pub fn buffer_size_for(max_frame: usize, offload: bool) -> usize {
        let base = if offload { 1 << 20 } else { 256 << 10 };
        base.max(2 * tap_read_room(max_frame)).max(2 * offload_room())
    }

    /// Shape both directions to `rate` bytes per second.
    pub fn shape(&mut self, rate: u64, now: Instant) {
        self.shaper = Some(Box::new([Bucket::new(rate, now), Bucket::new(rate, now)]));
    }

    /// Is direction `dir` (0: to the TAP, 1: to the WebSocket) out of tokens? Then note when
    /// to try again.
    fn throttled(&mut self, dir: usize, now: Instant) -> bool {
        let Some(b) = self.shaper.as_mut() else { return false };
        match b[dir].check(now) {
            Ok(()) => false,
            Err(at) => {
                self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
                true
            }
        }
    }

    fn spend(&mut self, dir: usize, bytes: usize) {
        if let Some(b) = self.shaper.as_mut() {
            b[dir].take(bytes);
        }
    }

    /// How long nothing has been read from the client.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    /// Give the TAP back (`wsnic connect` keeps it across reconnections).
    pub fn into_tap(self) -> Tap {
        self.tap
    }

    /// The connection ends: frames taken from the client that the TAP has not taken (a stalled
    /// frame, an open or staged offload batch) are counted as dropped, so every frame the
    /// client sent is accounted for.
    pub fn abandon_undelivered(&mut self) {
        self.stats.drop_tap_error += self.batch.0;
        self.batch = (0, 0);
        if self.stalled != Stalled::None {
            self.stats.drop_tap_error += 1;
            self.stalled = Stalled::None;
        }
    }

    /// The socket and the TAP, for a closing connection to linger on the one while the other
    /// goes to the reaper.
    pub fn into_parts(self) -> (Transport, Tap) {
        (self.sock, self.tap)
    }

    fn mask_key(&mut self) -> Option<[u8; 4]> {
        use rand::Rng;
        self.masker.as_mut().map(|r| r.random())
    }

    /// Queue raw bytes for the client (the handshake response), and bytes that arrived after
    /// the request head as WebSocket input.
    pub fn preload(&mut self, response: &[u8], early_input: &[u8], pool: &mut BufPool) {
        self.queue_raw(response, pool);
        if !early_input.is_empty() {
            let inb = self.inb.get_or_insert_with(|| pool.get());
            inb[..early_input.len()].copy_from_slice(early_input);
            self.in_start = 0;
            self.in_end = early_input.len();
        }
    }

    fn queue_raw(&mut self, bytes: &[u8], pool: &mut BufPool) {
        let outb = self.outb.get_or_insert_with(|| pool.get());
        outb[self.out_end..self.out_end + bytes.len()].copy_from_slice(bytes);
        self.out_end += bytes.len();
    }

    /// Queue a control frame, or an inspector's reply (room is always kept for one).
    fn queue_control(&mut self, opcode: Opcode, payload: &[u8], pool: &mut BufPool) {
        let mask = self.mask_key();
        let outb = self.outb.get_or_insert_with(|| pool.get());
        let n = encode_header(&mut outb[self.out_end..], true, opcode, payload.len(), mask);
        let body = &mut outb[self.out_end + n..self.out_end + n + payload.len()];
        body.copy_from_slice(payload);
        if let Some(m) = mask {
            apply_mask(body, m);
        }
        self.out_end += n + payload.len();
    }

    /// Queue a Close frame; the connection is closing from now on.
    pub fn queue_close(&mut self, code: u16, reason: &str, now: Instant, pool: &mut BufPool) {
        if self.closing.is_none() {
            self.compact_out();
            if self.out_room() >= CONTROL_ROOM {
                let (p, n) = close_payload(code, reason);
                self.queue_control(Opcode::Close, &p[..n], pool);
            }
            self.closing = Some(now);
        }
    }

    fn out_room(&self) -> usize {
        self.outb.as_ref().map_or(usize::MAX, |b| b.len() - self.out_end)
    }

    /// Is there room for `need` bytes behind the queued output, once it is moved to the front
    /// if that is what it takes? (No output buffer: unlimited room.)
    fn out_room_for(&mut self, need: usize) -> bool {
        if self.out_room() < need {
            self.compact_out();
        }
        self.out_room() >= need
    }

    fn compact_out(&mut self) {
        if let Some(outb) = self.outb.as_mut() {
            if self.out_start > 0 {
                outb.copy_within(self.out_start..self.out_end, 0);
                self.out_end -= self.out_start;
                self.out_start = 0;
            }
        }
    }

    /// Bytes queued for the client and not yet written.
    /// (TLS records rustls has not handed to the socket yet count as one byte.)
    pub fn pending_output(&self) -> usize {
        self.out_end - self.out_start + usize::from(self.sock.wants_write())
    }

    /// Write queued output; returns Err only for a dead socket.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.sock_writable && self.out_start < self.out_end {
            let outb = self.outb.as_ref().expect("pending output has a buffer");
            match self.sock.write(&outb[self.out_start..self.out_end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_start == self.out_end {
            self.out_start = 0;
            self.out_end = 0;
        }
        if self.sock_writable {
            match self.sock.flush_tls() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock_writable = false,
                r => r?,
            }
        }
        Ok(())
    }

    /// Give idle buffers back to the pool.
    pub fn release_idle(&mut self, pool: &mut BufPool) {
        if self.out_start == self.out_end {
            if let Some(b) = self.outb.take() {
                pool.put(b);
            }
        }
        if self.gro.is_empty() && self.staged == 0 {
            if let Some(b) = self.stage.take() {
                pool.put(b);
            }
        }
        if self.in_start == self.in_end && self.stalled == Stalled::None {
            self.in_start = 0;
            self.in_end = 0;
            if let Some(b) = self.inb.take() {
                pool.put(b);
            }
        }
    }

    /// Keepalive: ping a silent client, end an idle one.
    pub fn tick(
        &mut self,
        now: Instant,
        ping_interval: Duration,
        idle_timeout: Duration,
        pool: &mut BufPool,
    ) -> Option<Ending> {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= idle_timeout {
            return Some(Ending::new(format!("idle for {}s", silent.as_secs()), Some(close_code::GOING_AWAY)));
        }
        if silent >= ping_interval && !self.ping_sent && self.closing.is_none() {
            self.compact_out();
            if self.out_room() >= CONTROL_ROOM {
                self.queue_control(Opcode::Ping, b"wsnic", pool);
                self.ping_sent = true;
            }
        }
        None
    }

    /// Frames sent to the TAP since the last call (the event loop calls it once a tick).
    pub fn to_tap_since_tick(&mut self) -> u64 {
        let n = self.stats.to_tap_frames - self.to_tap_at_tick;
        self.to_tap_at_tick = self.stats.to_tap_frames;
        n
    }

    /// One pass over both directions.
    pub fn run(&mut self, now: Instant, pool: &mut BufPool, inspector: &mut dyn Inspector) -> Progress {
        if self.closing.is_some() {
            return match self.flush() {
                Err(e) => Progress::End(Ending::new(format!("socket error: {e}"), None)),
                Ok(()) => Progress::Idle,
            };
        }
        // Flush first: room made here lets both directions go on in this pass.
        if let Err(e) = self.flush() {
            return Progress::End(Ending::new(format!("socket error: {e}"), None));
        }
        let up = match self.ws_to_tap(now, pool, inspector) {
            Ok(again) => again,
            Err(end) => return Progress::End(end),
        };
        if self.tap_readable && self.outb.is_none() {
            self.outb = Some(pool.get());
        }
        let down = if self.tap.has_vnet_hdr() { self.tap_to_ws_offload(now, pool) } else { self.tap_to_ws(now) };
        if let Some(e) = self.tap_failed.take() {
            return Progress::End(Ending::new(
                format!("TAP {} failed: {e}", self.tap.name()),
                Some(close_code::INTERNAL),
            ));
        }
        let before = self.pending_output();
        if let Err(e) = self.flush() {
            return Progress::End(Ending::new(format!("socket error: {e}"), None));
        }
        // A direction that stopped for want of output room may go on now that the flush made
        // some: no readiness event would come for it (edge-triggered), so run again.
        let room_made = self.pending_output() < before && (self.tap_readable || self.sock_readable);
        self.release_idle(pool);
        if up || down || room_made {
            Progress::Again
        } else {
            Progress::Idle
        }
    }

    /// Returns Ok(true) when the budget ran out with input left. With offload, a batch of merged
    /// segments never outlives the pass: it goes to the TAP before this returns.
    fn ws_to_tap(&mut self, now: Instant, pool: &mut BufPool, inspector: &mut dyn Inspector) -> Result<bool, Ending> {
        if !self.tap.has_vnet_hdr() {
            return self.ws_frames_to_tap(now, pool, inspector);
        }
        if self.staged > 0 && !self.write_staged() {
            return Ok(false);
        }
        let r = self.ws_frames_to_tap(now, pool, inspector);
        if !self.gro.is_empty() {
            let stage = self.stage.as_mut().expect("a batch lives in the stage");
            self.staged = self.gro.finish(stage);
            self.write_staged();
        }
        r
    }

    /// Write the finished super-frame; false if the TAP would not take it yet. Its frames are
    /// counted now: delivered, or dropped if the kernel refused the batch.
    fn write_staged(&mut self) -> bool {
        let stage = self.stage.as_ref().expect("staged in it");
        let mut io = TapIo { tap: &self.tap, writable: &mut self.tap_writable, failed: &mut self.tap_failed };
        let wrote = io.write(None, &stage[..self.staged]);
        batch_written(wrote, &mut self.stats, &mut self.staged, &mut self.batch)
    }

    fn ws_frames_to_tap(
        &mut self,
        now: Instant,
        pool: &mut BufPool,
        inspector: &mut dyn Inspector,
    ) -> Result<bool, Ending> {
        for _ in 0..BUDGET {
            if self.throttled(0, now) {
                return Ok(false); // the socket is not read: TCP backpressure slows the client
            }
            if self.stalled != Stalled::None && !self.retry_stalled(pool) {
                return Ok(false);
            }
            // A control frame may need an answer: keep room for it, or wait for the socket.
            if !self.out_room_for(CONTROL_ROOM) {
                return Ok(false);
            }
            let inb = self.inb.get_or_insert_with(|| pool.get());
            let parsed = self.ws.parse(&mut inb[self.in_start..self.in_end]);
            match parsed {
                Ok(Parsed::Incomplete { .. }) => {
                    if !self.sock_readable {
                        return Ok(false);
                    }
                    if self.in_start > 0 {
                        inb.copy_within(self.in_start..self.in_end, 0);
                        self.in_end -= self.in_start;
                        self.in_start = 0;
                    }
                    match self.sock.read(&mut inb[self.in_end..]) {
                        Ok(0) => return Err(Ending::new("client closed the TCP connection", None)),
                        Ok(n) => {
                            self.in_end += n;
                            self.last_heard = now;
                            self.ping_sent = false;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.sock_readable = false;
                            return Ok(false);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Ending::new(format!("socket error: {e}"), None)),
                    }
                }
                Ok(Parsed::Consumed(n)) => self.in_start += n,
                Ok(Parsed::Item { consumed, item }) => self.on_item(consumed, item, now, pool, inspector)?,
                Err(v) => {
                    self.queue_close(v.code, v.reason, now, pool);
                    return Err(Ending::new(format!("protocol error: {}", v.reason), Some(v.code)));
                }
            }
        }
        Ok(true)
    }

    fn on_item(
        &mut self,
        consumed: usize,
        item: Item,
        now: Instant,
        pool: &mut BufPool,
        inspector: &mut dyn Inspector,
    ) -> Result<(), Ending> {
        let base = self.in_start;
        match item {
            Item::Binary(p) => {
                let (frame, stalled) = match p {
                    Payload::InBuf(r) => {
                        let (start, end) = (base + r.start, base + r.end);
                        (
                            &self.inb.as_ref().expect("parsed from it")[start..end],
                            Stalled::InBuf { start, end, consumed },
                        )
                    }
                    Payload::Assembled => (self.ws.assembled(), Stalled::Assembled { consumed }),
                };
                if frame.len() >= MIN_FRAME {
                    match inspector.inspect(self.id, &mut self.state, frame) {
                        Verdict::Forward => {}
                        Verdict::Reply(reply) if reply.len() <= MAX_REPLY => {
                            self.queue_control(Opcode::Binary, reply, pool);
                            self.stats.answered += 1;
                            self.stats.to_ws_frames += 1;
                            self.stats.to_ws_bytes += reply.len() as u64;
                            self.in_start += consumed;
                            return Ok(());
                        }
                        Verdict::Reply(reply) => {
                            log::error!(
                                "{}: inspector reply of {} bytes is too large; dropped",
                                self.peer,
                                reply.len()
                            );
                            self.stats.answered += 1;
                            self.in_start += consumed;
                            return Ok(());
                        }
                        Verdict::Consume => {
                            self.stats.answered += 1;
                            self.in_start += consumed;
                            return Ok(());
                        }
                        Verdict::Drop(why) => {
                            self.stats.drop_policy += 1;
                            log::debug!("{}: frame dropped: {why}", self.peer);
                            self.in_start += consumed;
                            return Ok(());
                        }
                    }
                }
                self.stalled = stalled;
                self.retry_stalled(pool);
                return Ok(());
            }
            Item::Text(_) => {
                self.stats.drop_text += 1;
                log::debug!("{}: text message dropped", self.peer);
            }
            Item::Ping(r) => {
                let inb = self.inb.take().expect("parsed from it");
                self.queue_control(Opcode::Pong, &inb[base + r.start..base + r.end], pool);
                self.inb = Some(inb);
            }
            Item::Pong(_) => {}
            Item::Close { code, .. } => {
                self.in_start += consumed;
                // Echo the peer's code (§5.5.1); a Close without one is answered without one.
                let (p, n) = code.map_or(([0; 125], 0), |c| close_payload(c, ""));
                self.compact_out();
                self.queue_control(Opcode::Close, &p[..n], pool);
                self.closing = Some(now);
                self.client_sent_close = true;
                let how = code.map_or("no code".to_string(), |c| c.to_string());
                return Err(Ending::new(format!("client closed ({how})"), None));
            }
        }
        self.in_start += consumed;
        Ok(())
    }

    /// Try to hand the stalled frame to the TAP; false if the TAP would block.
    fn retry_stalled(&mut self, pool: &mut BufPool) -> bool {
        if self.staged > 0 && !self.write_staged() {
            return false; // an earlier batch goes first
        }
        let (frame, consumed) = match self.stalled {
            Stalled::None => return true,
            Stalled::InBuf { start, end, consumed } => {
                (&self.inb.as_ref().expect("stalled in it")[start..end], consumed)
            }
            Stalled::Assembled { consumed } => (self.ws.assembled(), consumed),
        };
        if frame.len() < MIN_FRAME {
            self.stats.drop_runt += 1;
        } else if !self.tap_writable {
            return false;
        } else {
            let vnet = self.tap.has_vnet_hdr();
            let len = frame.len();
            // Offload: a TCP segment joins the open batch (or closes it and starts the next);
            // anything else closes the batch and goes alone behind a plain header. Order is kept:
            // a batch is always written before the frame after it.
            let alone = !vnet || {
                let cand = Candidate::parse(frame);
                let stage = self.stage.get_or_insert_with(|| pool.get());
                loop {
                    let push = match &cand {
                        Some(c) => self.gro.push(stage, frame, c),
                        None if self.gro.is_empty() => Push::Alone,
                        None => Push::Flush,
                    };
                    match push {
                        Push::Alone => break true,
                        // Counted as delivered when the batch is written.
                        Push::Staged => {
                            self.batch = (self.batch.0 + 1, self.batch.1 + len as u64);
                            break false;
                        }
                        Push::Full | Push::Flush => {
                            if push == Push::Full {
                                self.batch = (self.batch.0 + 1, self.batch.1 + len as u64);
                            }
                            self.staged = self.gro.finish(stage);
                            let mut io = TapIo {
                                tap: &self.tap,
                                writable: &mut self.tap_writable,
                                failed: &mut self.tap_failed,
                            };
                            let wrote = io.write(None, &stage[..self.staged]);
                            batch_written(wrote, &mut self.stats, &mut self.staged, &mut self.batch);
                            if push == Push::Full {
                                break false; // the frame is in the batch, which waits for the TAP if it must
                            }
                            if wrote == Wrote::Blocked {
                                return false; // the frame stays stalled behind the batch
                            }
                        }
                    }
                }
            };
            if alone {
                let mut io = TapIo { tap: &self.tap, writable: &mut self.tap_writable, failed: &mut self.tap_failed };
                let wrote = match self.stalled {
                    _ if !vnet => io.write(None, frame), // no header at all
                    // The bytes before the frame (its WebSocket header, frames already passed
                    // on) are spent: the plain header goes there, and the frame leaves with one
                    // write() rather than a writev() of two pieces.
                    Stalled::InBuf { start, end, .. } if start >= VNET_HDR_LEN => {
                        let inb = self.inb.as_mut().expect("stalled in it");
                        inb[start - VNET_HDR_LEN..start].copy_from_slice(&vnet::ZERO);
                        io.write(None, &inb[start - VNET_HDR_LEN..end])
                    }
                    _ => io.write(Some(&vnet::ZERO), frame),
                };
                match wrote {
                    Wrote::Blocked => return false,
                    Wrote::Yes => {
                        self.stats.to_tap_frames += 1;
                        self.stats.to_tap_bytes += len as u64;
                    }
                    Wrote::Refused => self.stats.drop_tap_error += 1,
                }
            }
            self.spend(0, len);
        }
        self.in_start += consumed;
        self.stalled = Stalled::None;
        true
    }

    /// Offload: each TAP read may be a super-frame; it is cut into real Ethernet frames, each
    /// written straight behind its WebSocket header in the output buffer (a plain frame is
    /// copied once). Returns true when the budget ran out with the TAP still readable.
    fn tap_to_ws_offload(&mut self, now: Instant, pool: &mut BufPool) -> bool {
        let room = offload_room();
        for _ in 0..BUDGET {
            if !self.tap_readable || self.throttled(1, now) {
                return false;
            }
            if self.outb.is_none() || !self.out_room_for(room) {
                return false; // over the high-water mark: let the kernel queue drop
            }
            let scratch = pool.scratch(OFFLOAD_READ);
            let n = match self.tap.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tap_readable = false;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.tap_readable = false;
                    self.tap_failed = Some(e);
                    return false;
                }
            };
            let plan = match VnetHdr::parse(&scratch[..n]) {
                Some(h) if n < OFFLOAD_READ => segment::plan(&h, &scratch[VNET_HDR_LEN..n]),
                _ => Err(segment::Error::Truncated),
            };
            // The room checked above fits MAX_SEGMENTS segments. A super-frame the kernel did not
            // hold to `gso_max_segs` (one forwarded from another TAP or a VM) may need more:
            // moving the queued output to the front may make it; otherwise it is dropped.
            let plan = match plan {
                Ok(p) if self.out_room_for(p.total_len() + p.count() * MAX_HEADER + CONTROL_ROOM) => p,
                r => {
                    self.stats.drop_offload += 1;
                    log::debug!("{}: {} handed over a frame of {n} bytes not cut: {r:?}", self.peer, self.tap.name());
                    continue;
                }
            };
            let frame = &scratch[VNET_HDR_LEN..n];
            let outb = self.outb.as_mut().expect("checked above");
            for i in 0..plan.count() {
                let len = plan.seg_len(i);
                if len > self.max_frame {
                    self.stats.drop_oversize += 1;
                    continue;
                }
                let mask = self.masker.as_mut().map(|r| rand::Rng::random::<[u8; 4]>(&mut **r));
                let base = self.out_end;
                let h = encode_header(&mut outb[base..], true, Opcode::Binary, len, mask);
                let seg = &mut outb[base + h..base + h + len];
                plan.write(frame, i, seg);
                if let Some(m) = mask {
                    apply_mask(seg, m);
                }
                self.out_end = base + h + len;
                self.stats.to_ws_frames += 1;
                self.stats.to_ws_bytes += len as u64;
                if let Some(b) = self.shaper.as_mut() {
                    b[1].take(len);
                }
            }
        }
        true
    }

    /// Returns true when the budget ran out with the TAP still readable and room left.
    fn tap_to_ws(&mut self, now: Instant) -> bool {
        let need = tap_read_room(self.max_frame);
        let masked = self.masker.is_some();
        // Read behind room for the header of a frame of 126..65535 bytes (4 bytes, 8 when
        // masked); move the rare small or huge frame to fit its shorter or longer header.
        let guess = header_len(1500, masked);
        for _ in 0..BUDGET {
            if !self.tap_readable || self.throttled(1, now) {
                return false; // throttled: the TAP's queue fills and drops, the guest's TCP slows
            }
            if self.outb.is_none() || !self.out_room_for(need) {
                return false; // over the high-water mark: let the kernel queue drop
            }
            let mask = self.mask_key();
            let outb = self.outb.as_mut().expect("checked above");
            let base = self.out_end;
            match self.tap.read(&mut outb[base + guess..base + guess + self.max_frame + 1]) {
                Ok(n) if n > self.max_frame => self.stats.drop_oversize += 1,
                Ok(n) => {
                    let h = header_len(n, masked);
                    if h != guess {
                        outb.copy_within(base + guess..base + guess + n, base + h);
                    }
                    encode_header(&mut outb[base..], true, Opcode::Binary, n, mask);
                    if let Some(m) = mask {
                        apply_mask(&mut outb[base + h..base + h + n], m);
                    }
                    self.out_end = base + h + n;
                    self.stats.to_ws_frames += 1;
                    self.stats.to_ws_bytes += n as u64;
                    self.spend(1, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tap_readable = false;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.tap_readable = false;
                    self.tap_failed = Some(e);
                    return false;
                }
            }
        }
        true
    }
}
