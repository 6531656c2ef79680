//! `wsnic connect`: a TAP device on this machine, carried over one WebSocket to a relay —
//! what a browser VM does, for a real kernel. The TAP and its MAC outlive the WebSocket:
//! when the relay goes away, the connection is retried with capped exponential backoff, so a
//! guest's DHCP lease and sockets survive a relay restart. SIGINT/SIGTERM closes the
//! WebSocket (1001) and removes the TAP.
//!
//! The frame path is `relay::pipe::Pipe` in the client role: the same batching, budgets and
//! backpressure as the relay's, plus a fresh random mask key per frame.

use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::relay::bufpool::BufPool;
use crate::relay::pipe::{PassThrough, Pipe, Progress};
use crate::relay::transport::Transport;
use crate::sys::{format_mac, netlink::Netlink, stable_mac, tap::Tap};
use crate::ws::handshake::{client_request, parse_response, Response};
use crate::ws::{close_code, Role};

const SOCK: Token = Token(0);
const TAP: Token = Token(1);
const SIGNALS: Token = Token(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    /// TAP name or pattern (`%d` is replaced by the kernel).
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub max_frame: usize,
    /// Open the TAP with `IFF_VNET_HDR` and segmentation offload.
    pub offload: bool,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// wss://: trust only this CA bundle (PEM) instead of the system's roots.
    pub ca: Option<std::path::PathBuf>,
}

/// Where to connect: `ws://HOST[:PORT][/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to resolve and connect to.
    pub authority: String,
    /// The Host header.
    pub host_header: String,
    /// Path and query.
    pub path: String,
    /// wss://: TLS, verifying the server's certificate for `host`.
    pub tls: bool,
    /// The host name (or address) the certificate must name.
    pub host: String,
}

pub fn parse_url(url: &str) -> Result<Target, String> {
    let bad = || format!("bad URL {url:?}: expected ws://HOST[:PORT][/PATH] or wss://…");
    let (tls, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(bad()),
    };
    let (hostport, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if hostport.is_empty() || hostport.contains(['@', ' ']) {
        return Err(bad());
    }
    // [v6]:port, host:port, or host alone.
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let default_port = if tls { 443 } else { 80 };
    let port: u16 = match port {
        Some(p) => p.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => default_port,
    };
    if host.is_empty() || host == "[]" {
        return Err(bad());
    }
    let host_header = if port == default_port { host.clone() } else { format!("{host}:{port}") };
    let name = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(Target { authority: format!("{host}:{port}"), host_header, path, tls, host: name })
}

/// How one WebSocket session ended.
enum End {
    Signal,
    /// The connection failed or was lost; `established` if the handshake had succeeded.
    Lost {
        reason: String,
        established: bool,
    },
}

/// Run until SIGINT/SIGTERM. Errors before the first successful handshake are returned
/// (bad address, connection refused, handshake refused): the user likely mistyped.
pub fn run(opts: &Options) -> Result<(), String> {
    let target = parse_url(&opts.url)?;
    let mut tap =
        Tap::open(&opts.tap, opts.offload, false).map_err(|e| format!("cannot create TAP device {}: {e}", opts.tap))?;
    let mac = opts.mac.unwrap_or_else(|| stable_mac(tap.name()));
    let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
    if tap.has_vnet_hdr() {
        nl.set_gso_max_segs(tap.index(), crate::relay::pipe::MAX_SEGMENTS as u32)
            .map_err(|e| format!("configuring {}: {e}", tap.name()))?;
    }
    nl.set_mac_up(tap.index(), mac).map_err(|e| format!("configuring {}: {e}", tap.name()))?;
    log::info!("{} is up with MAC {}; run a DHCP client on it or give it an address", tap.name(), format_mac(&mac));

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| e.to_string())?;
    poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(|e| e.to_string())?;
    let mut pool = BufPool::new(Pipe::buffer_size_for(opts.max_frame, opts.offload), 2);
    let mut backoff = BACKOFF_FIRST;
    let mut ever_connected = false;
    loop {
        let (t, end) = session(&mut poll, &mut signals, &target, tap, opts, &mut pool);
        tap = t;
        match end {
            End::Signal => break,
            End::Lost { reason, established } => {
                if !ever_connected && !established {
                    return Err(reason);
                }
                if established {
                    ever_connected = true;
                    backoff = BACKOFF_FIRST;
                }
                log::warn!("{reason}; reconnecting in {:.1}s", backoff.as_secs_f64());
                if wait_for_signal(&mut poll, &mut signals, backoff) {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    log::info!("removing {}", tap.name());
    Ok(())
}

/// Sleep for `d` unless a signal comes; true if one did.
fn wait_for_signal(poll: &mut Poll, signals: &mut Signals, d: Duration) -> bool {
    let mut events = Events::with_capacity(4);
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if poll.poll(&mut events, Some(left)).is_ok() && signals.pending().next().is_some() {
            return true;
        }
    }
}

/// Connect, handshake (blocking, with timeouts), then run the pipe until it ends.
fn session(
    poll: &mut Poll,
    signals: &mut Signals,
    target: &Target,
    tap: Tap,
    opts: &Options,
    pool: &mut BufPool,
) -> (Tap, End) {
    let lost = |reason: String| End::Lost { reason, established: false };
    let (mut sock, peer, early) = match handshake(target, opts) {
        Ok(x) => x,
        Err(reason) => return (tap, lost(reason)),
    };
    let tap_fd = tap.as_raw_fd();
    let reg = poll.registry();
    if let Err(e) = reg
        .register(&mut sock, SOCK, Interest::READABLE | Interest::WRITABLE)
        .and_then(|()| reg.register(&mut SourceFd(&tap_fd), TAP, Interest::READABLE | Interest::WRITABLE))
    {
        return (tap, lost(format!("event loop: {e}")));
    }
    log::info!("connected to {} ({peer}) on {}", target.authority, tap.name());
    let start = Instant::now();
    let mut pipe = Pipe::new(0, sock, tap, peer, Role::Client, opts.max_frame, start);
    pipe.preload(&[], &early, pool);

    let mut events = Events::with_capacity(16);
    let mut next_tick = start + Duration::from_secs(1);
    let mut again = true;
    let end = loop {
        let timeout = if again { Duration::ZERO } else { next_tick.saturating_duration_since(Instant::now()) };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                break End::Lost { reason: format!("event loop: {e}"), established: true };
            }
        }
        let now = Instant::now();
        let mut signalled = false;
        for ev in events.iter() {
            match ev.token() {
                SOCK => {
                    pipe.sock_readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    pipe.sock_writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                }
                TAP => {
                    pipe.tap_readable |= ev.is_readable();
                    pipe.tap_writable |= ev.is_writable();
                }
                _ => signalled |= signals.pending().next().is_some(),
            }
        }
        if signalled {
            pipe.queue_close(close_code::GOING_AWAY, "wsnic connect exiting", now, pool);
            let _ = pipe.flush();
            break End::Signal;
        }
        match pipe.run(now, pool, &mut PassThrough) {
            Progress::Again => again = true,
            Progress::Idle => again = false,
            Progress::End(e) => {
                if let Some(code) = e.code {
                    pipe.queue_close(code, &e.reason, now, pool);
                    let _ = pipe.flush();
                }
                break End::Lost {
                    reason: format!("connection to {} lost: {}", target.authority, e.reason),
                    established: true,
                };
            }
        }
        if now >= next_tick {
            next_tick = now + Duration::from_secs(1);
            if let Some(e) = pipe.tick(now, opts.ping_interval, opts.idle_timeout, pool) {
                pipe.queue_close(close_code::GOING_AWAY, &e.reason, now, pool);
                let _ = pipe.flush();
                break End::Lost {
                    reason: format!("relay {} silent: {}", target.authority, e.reason),
                    established: true,
                };
            }
            again |= pipe.pending_output() > 0;
        }
    };
    // TLS: say goodbye properly (close_notify), so proxies in front do not log a truncation.
    let _ = pipe.sock.shutdown(std::net::Shutdown::Write);
    let s = pipe.stats;
    log::info!(
        "session on {} ended after {:.1}s: sent {} frames {} bytes, received {} frames {} bytes, dropped {}",
        pipe.tap.name(),
        start.elapsed().as_secs_f64(),
        s.to_ws_frames,
        s.to_ws_bytes,
        s.to_tap_frames,
        s.to_tap_bytes,
        s.drops()
    );
    pipe.release_idle(pool);
    let _ = poll.registry().deregister(&mut SourceFd(&tap_fd));
    (pipe.into_tap(), end)
}

/// TCP connect and the opening handshake; returns the stream (non-blocking), the peer and
/// any WebSocket bytes that came with the response.
/// The TLS client configuration: the CA bundle given, or the system's roots.
fn tls_client(opts: &Options) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca {
        Some(path) => {
            let certs = crate::tls::load_certs(path)?;
            for c in certs {
                roots.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err("no system CA certificates found; give one with --ca FILE".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// TCP connect, TLS for wss://, and the opening handshake (blocking, with timeouts). Returns
/// the transport (non-blocking from then on), the peer and any WebSocket bytes that came with
/// the response.
fn handshake(target: &Target, opts: &Options) -> Result<(Transport, SocketAddr, Vec<u8>), String> {
    let (s, peer, early, tls) = handshake_io(target, opts)?;
    let io = |e: std::io::Error| format!("handshake with {}: {e}", target.authority);
    s.set_nonblocking(true).map_err(io)?;
    let sock = TcpStream::from_std(s);
    let transport = match tls {
        Some(conn) => Transport::Tls(sock, Box::new(conn.into())),
        None => Transport::Plain(sock),
    };
    Ok((transport, peer, early))
}

type Handshaken = (std::net::TcpStream, SocketAddr, Vec<u8>, Option<rustls::ClientConnection>);

fn handshake_io(target: &Target, opts: &Options) -> Result<Handshaken, String> {
    let addrs: Vec<SocketAddr> =
        target.authority.to_socket_addrs().map_err(|e| format!("cannot resolve {}: {e}", target.authority))?.collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match std::net::TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some((s, *a));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let (mut s, peer) = stream.ok_or_else(|| {
        format!("cannot connect to {}: {}", target.authority, last.map_or("no address".into(), |e| e.to_string()))
    })?;
    let _ = s.set_nodelay(true);
    let io = |e: std::io::Error| format!("handshake with {}: {e}", target.authority);
    s.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
    let mut tls = match target.tls {
        false => None,
        true => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{}: {e}", target.host))?;
            Some(rustls::ClientConnection::new(tls_client(opts)?, name).map_err(|e| format!("TLS: {e}"))?)
        }
    };
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let request = client_request(&target.host_header, &target.path, &key);
    let tls_err = |e: std::io::Error| format!("TLS with {}: {e}", target.authority);
    match &mut tls {
        Some(c) => rustls::Stream::new(c, &mut s).write_all(&request).map_err(tls_err)?,
        None => s.write_all(&request).map_err(io)?,
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match &mut tls {
            Some(c) => rustls::Stream::new(c, &mut s).read(&mut chunk).map_err(tls_err)?,
            None => s.read(&mut chunk).map_err(io)?,
        };
        if n == 0 {
            return Err(format!("handshake with {}: connection closed by the server", target.authority));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_response(&buf, &key) {
            Response::Partial => continue,
            Response::Accepted { head_len } => {
                let early = buf.split_off(head_len);
                return Ok((s, peer, early, tls));
            }
            Response::Refused { status, reason } => {
                return Err(format!("handshake refused by {}: {status} {reason}", target.authority))
            }
            Response::Invalid(why) => return Err(format!("handshake with {}: {why}", target.authority)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:8070/").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host_header.as_str(), t.path.as_str()),
            ("127.0.0.1:8070", "127.0.0.1:8070", "/")
        );
        let t = parse_url("ws://relay.example?token=x").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host_header.as_str(), t.path.as_str()),
            ("relay.example:80", "relay.example", "/?token=x")
        );
        let t = parse_url("ws://[::1]:9000/a/b").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("[::1]:9000", "/a/b"));
        for bad in ["http://x/", "ws://", "ws://:80/", "ws://h:0/", "ws://h:99999/", "127.0.0.1:8070", "ws://u@h/"] {
            assert!(parse_url(bad).unwrap_err().starts_with("bad URL"), "{bad}");
        }
        let t = parse_url("wss://relay.example/x").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host_header.as_str(), t.tls, t.host.as_str()),
            ("relay.example:443", "relay.example", true, "relay.example")
        );
    }
}
