//! The load generators, in this process: a minimal WebSocket client (handshake, masked frames
//! with a fixed key, the server's unmasked frames parsed), a writer that pushes pre-built
//! batches of frames into many client sockets (client→TAP), a reader that counts the frames
//! the clients receive (TAP→client), and an AF_PACKET injector that sends frames out of the
//! relay's TAPs from the kernel side with `sendmmsg` and `PACKET_QDISC_BYPASS`.
//!
//! Worker threads enter the relay's network namespace themselves ([`enter_netns`]); sockets
//! made there keep that namespace whichever thread uses them later.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::test_support::client_frame;
pub use crate::test_support::enter_netns;

/// IEEE 802 local experimental ethertype: the kernel drops it cheaply.
pub const ETHERTYPE_BENCH: u16 = 0x88B5;

/// The calling thread's kernel id, for `/proc/self/task/TID/stat`.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The `i`th client's MAC: unicast, locally administered, the same for the same `i`.
pub fn client_mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x02, 0xbe, b[0], b[1], b[2], b[3]]
}

/// An Ethernet frame of exactly `len` bytes (≥ 14), ethertype [`ETHERTYPE_BENCH`], zero padded.
pub fn bench_frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(14)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE_BENCH.to_be_bytes());
    f
}

/// One server (unmasked) frame at the start of `buf`: (opcode, payload start, frame end), or
/// None if it is not all there yet.
pub fn parse_server_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (hdr, len) = match buf[1] & 0x7f {
        126 => (4, u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize),
        n => (2, n as usize),
    };
    (buf.len() >= hdr + len).then_some((buf[0] & 0x0f, hdr, hdr + len))
}

/// A WebSocket client connection with a MAC of its own.
pub struct WsClient {
    pub s: TcpStream,
    pub mac: [u8; 6],
    /// Bytes read past what has been parsed.
    rx: Vec<u8>,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

impl WsClient {
    /// TCP connect (from the calling thread's namespace), handshake, 101.
    pub fn connect(addr: &str, mac: [u8; 6]) -> io::Result<WsClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(REQUEST)?;
        let mut rx = Vec::with_capacity(512);
        let mut buf = [0u8; 512];
        let end = loop {
            if let Some(p) = rx.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut buf)?;
            if n == 0 || rx.len() > 8192 {
                return Err(io::Error::other(format!("handshake: EOF after {:?}", String::from_utf8_lossy(&rx))));
            }
            rx.extend_from_slice(&buf[..n]);
        };
        if !rx.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&rx[..end]).lines().next().unwrap_or("").to_string();
            return Err(io::Error::other(format!("handshake refused: {head}")));
        }
        rx.drain(..end);
        Ok(WsClient { s, mac, rx })
    }

    /// Send one binary message (masked).
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.s.write_all(&client_frame(2, payload))
    }

    /// The next frame from the server: (opcode, payload).
    pub fn read_frame(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some((op, start, end)) = parse_server_frame(&self.rx) {
                let p = self.rx[start..end].to_vec();
                self.rx.drain(..end);
                return Ok((op, p));
            }
            let n = self.s.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.rx.extend_from_slice(&buf[..n]);
        }
    }

    /// Close as a client should: a Close frame (1000), then read until the server's Close or EOF.
    pub fn close(mut self) -> io::Result<()> {
        self.s.set_nonblocking(false)?;
        self.s.write_all(&client_frame(8, &1000u16.to_be_bytes()))?;
        loop {
            match self.read_frame() {
                Ok((8, _)) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Connect `n` clients with MACs `client_mac(first..first+n)` from a thread in namespace
/// `ns`, and have each send one frame (`hello(mac)`) so that its MAC is locked and learned.
pub fn connect_clients(
    ns: &str,
    first: u32,
    n: u32,
    hello: impl Fn([u8; 6]) -> Vec<u8> + Send + 'static,
) -> Vec<WsClient> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        (first..first + n)
            .map(|i| {
                let mac = client_mac(i);
                let mut c = WsClient::connect("127.0.0.1:8070", mac)
                    .unwrap_or_else(|e| panic!("client {i} of {n} could not connect to the relay: {e}"));
                c.send(&hello(mac)).unwrap_or_else(|e| panic!("client {i}: first frame: {e}"));
                c
            })
            .collect()
    })
    .join()
    .expect("connecting clients")
}

/// A background load thread: stopped and joined on drop. `tid` is its kernel thread id.
pub struct Worker {
    pub tid: i32,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(f: impl FnOnce(&AtomicBool) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let (s, t) = (stop.clone(), tid.clone());
        let handle = std::thread::spawn(move || {
            t.store(gettid(), Ordering::SeqCst);
            f(&s)
        });
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        Worker { tid: tid.load(Ordering::SeqCst), stop, handle: Some(handle) }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            if let Err(e) = h.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(e);
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.finish();
    }
}

/// poll() the sockets for `events`; returns the revents, empty on timeout.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: fds is a valid slice of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
        panic!("poll: {}", io::Error::last_os_error());
    }
}

/// Answer a server PING on `s` (so a long run never looks idle); best effort.
fn pong(s: &mut TcpStream, payload: &[u8]) {
    let _ = s.write(&client_frame(10, payload));
}

/// client→TAP: one thread writes, into every client socket, a pre-built batch of masked frames
/// of `frame_len` bytes addressed to `dst` from the client's MAC, over and over, as fast as TCP
/// takes them. What the server sends back is read and dropped (PINGs answered).
pub fn start_writer(clients: Vec<WsClient>, dst: [u8; 6], frame_len: usize) -> Worker {
    const BATCH_BYTES: usize = 256 * 1024;
    let mut conns: Vec<(WsClient, Vec<u8>, usize)> = clients
        .into_iter()
        .map(|c| {
            let one = client_frame(2, &bench_frame(dst, c.mac, frame_len));
            let batch = one.repeat((BATCH_BYTES / one.len()).max(1));
            c.s.set_nonblocking(true).unwrap();
            (c, batch, 0)
        })
        .collect();
    Worker::spawn(move |stop| {
        let mut fds: Vec<libc::pollfd> = conns
            .iter()
            .map(|(c, _, _)| libc::pollfd { fd: c.s.as_raw_fd(), events: libc::POLLOUT | libc::POLLIN, revents: 0 })
            .collect();
        let mut sink = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            poll(&mut fds, 100);
            for (fd, (c, batch, pos)) in fds.iter_mut().zip(conns.iter_mut()) {
                if fd.revents & libc::POLLOUT != 0 {
                    match c.s.write(&batch[*pos..]) {
                        Ok(n) => *pos = (*pos + n) % batch.len(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("client→TAP writer: the relay closed a client: {e}"),
                    }
                }
                if fd.revents & libc::POLLIN != 0 {
                    if let Ok(n) = c.s.read(&mut sink) {
                        c.rx.extend_from_slice(&sink[..n]);
                        while let Some((op, start, end)) = parse_server_frame(&c.rx) {
                            if op == 9 {
                                let p = c.rx[start..end].to_vec();
                                pong(&mut c.s, &p);
                            }
                            c.rx.drain(..end);
                        }
                    }
                }
                fd.revents = 0;
            }
        }
    })
}

/// TAP→client: one thread reads every client socket and counts the binary frames of
/// ethertype [`ETHERTYPE_BENCH`] into `received` (PINGs answered, anything else ignored).
///
/// It reads in sweeps: every socket until it is empty, then a 500 µs pause, so that each
/// read() takes many frames and the relay's writes rarely have to wake it (a reader woken
/// for every write costs more CPU than the relay's work it is there to count). The sockets'
/// receive buffers (4 MiB) hold far more than arrives in a pause.
pub fn start_reader(clients: Vec<WsClient>, received: Arc<AtomicU64>) -> Worker {
    const BUF: usize = 256 * 1024;
    let mut conns: Vec<(WsClient, Vec<u8>, usize)> = clients
        .into_iter()
        .map(|c| {
            c.s.set_nonblocking(true).unwrap();
            socket2::SockRef::from(&c.s).set_recv_buffer_size(4 << 20).unwrap();
            let mut buf = vec![0u8; BUF];
            let have = c.rx.len();
            buf[..have].copy_from_slice(&c.rx);
            (c, buf, have)
        })
        .collect();
    Worker::spawn(move |stop| {
        while !stop.load(Ordering::Relaxed) {
            for (c, buf, have) in conns.iter_mut() {
                loop {
                    let n = match c.s.read(&mut buf[*have..]) {
                        Ok(0) => panic!("TAP→client reader: the relay closed a client"),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("TAP→client reader: {e}"),
                    };
                    *have += n;
                    let (mut at, mut count) = (0, 0);
                    while let Some((op, start, end)) = parse_server_frame(&buf[at..*have]) {
                        let p = &buf[at + start..at + end];
                        if op == 2 && p.len() >= 14 && p[12..14] == ETHERTYPE_BENCH.to_be_bytes() {
                            count += 1;
                        } else if op == 9 {
                            let p = p.to_vec();
                            pong(&mut c.s, &p);
                        }
                        at += end;
                    }
                    buf.copy_within(at..*have, 0);
                    *have -= at;
                    assert!(*have < buf.len(), "a server frame larger than the reader's buffer");
                    received.fetch_add(count, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    })
}

/// Where the injector sends: a TAP's interface index and the MAC of the client behind it.
#[derive(Clone, Copy, Debug)]
pub struct TapTarget {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The interface index of `name` in namespace `ns`.
pub fn ifindex_in(ns: &str, name: &str) -> u32 {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || {
        enter_netns(&ns);
        let c = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: c is a valid NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(i, 0, "no interface {name} in {ns}");
        i
    })
    .join()
    .unwrap()
}

/// What the injector did: frames the TAPs queued, frames refused because a TAP's queue was full.
#[derive(Default)]
pub struct Injected {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
}

/// TAP→client load: an AF_PACKET socket in namespace `ns` sends frames of `frame_len` bytes
/// out of the targets' TAPs, round-robin, in `sendmmsg` batches of 64, bypassing the qdisc.
/// A TAP whose queue (500 frames) is full refuses a frame, which ends the batch early; the
/// injector then pauses 100 µs — much less than the relay needs to drain a full queue — so
/// the queues stay full without the injector burning a core the relay needs.
pub fn start_injector(ns: &str, targets: Vec<TapTarget>, frame_len: usize, counts: Arc<Injected>) -> Worker {
    const BATCH: usize = 64;
    let ns = ns.to_string();
    Worker::spawn(move |stop| {
        enter_netns(&ns);
        // SAFETY: plain socket(2); protocol 0 means this socket receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        let set = |level, opt, val: libc::c_int| {
            // SAFETY: val is a c_int that outlives the call.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    opt,
                    &val as *const _ as *const libc::c_void,
                    size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(r, 0, "setsockopt {opt}: {}", io::Error::last_os_error());
        };
        set(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
        // Room for every TAP's queue to fill, so the relay always has frames and a full
        // queue drops (tx_dropped) rather than blocking the sender.
        set(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 64 << 20);

        let src = [0x02, 0xbe, 0xff, 0, 0, 1];
        let frames: Vec<Vec<u8>> = targets.iter().map(|t| bench_frame(t.mac, src, frame_len)).collect();
        let addrs: Vec<libc::sockaddr_ll> = targets
            .iter()
            .map(|t| {
                // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
                let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                a.sll_family = libc::AF_PACKET as u16;
                a.sll_protocol = ETHERTYPE_BENCH.to_be();
                a.sll_ifindex = t.ifindex as i32;
                a.sll_halen = 6;
                a.sll_addr[..6].copy_from_slice(&t.mac);
                a
            })
            .collect();
        // A ring of batches covering every target equally often.
        let per_round = BATCH * targets.len();
        let mut iovs: Vec<libc::iovec> = (0..per_round)
            .map(|i| libc::iovec { iov_base: frames[i % targets.len()].as_ptr() as *mut _, iov_len: frame_len })
            .collect();
        // BATCH more than a round, so a batch may start anywhere in the round.
        let mut msgs: Vec<libc::mmsghdr> = (0..per_round + BATCH)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = &addrs[i % targets.len()] as *const _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                m.msg_hdr.msg_iov = &mut iovs[i % per_round] as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut at = 0;
        let mut last_err = Instant::now() - Duration::from_secs(10);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: msgs[at..at+BATCH] point at live frames, addresses and iovecs.
            let r = unsafe { libc::sendmmsg(fd, msgs[at..].as_mut_ptr(), BATCH as u32, 0) };
            let accepted = if r >= 0 {
                r as usize
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) && last_err.elapsed() > Duration::from_secs(5) {
                    eprintln!("injector: sendmmsg: {e}");
                    last_err = Instant::now();
                }
                0
            };
            counts.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
            if accepted < BATCH {
                // ENOBUFS on message `accepted`: that TAP's queue is full. Skip the refused
                // frame and let the relay drain.
                counts.refused.fetch_add(1, Ordering::Relaxed);
                at = (at + accepted + 1) % per_round;
                std::thread::sleep(Duration::from_micros(100));
            } else {
                at = (at + BATCH) % per_round;
            }
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    })
}
