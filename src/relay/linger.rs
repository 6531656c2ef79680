//! A connection on its way out: the last bytes we owe the peer (an HTTP refusal, a status
//! page; nothing for a client whose Close is already flushed), written as the socket takes
//! them; then our side shut down, so a FIN follows them; then whatever the peer still sends
//! read and thrown away until it closes too or the deadline passes. A client that sent its
//! WebSocket Close sends nothing more: it is closed once its input so far has been read.
//!
//! Closing a TCP socket that has unread input makes Linux answer with a reset instead of a
//! FIN, and a reset throws away what the kernel still held of our last bytes: a client that
//! was sending when we ended it (a frame over the size limit, an upload at the moment of a
//! shutdown) would see its connection reset instead of our Close frame or HTTP answer.

use std::io::{self, Read};
use std::net::Shutdown;
use std::time::Instant;

use super::transport::Transport;

/// Bytes read and discarded per call, at most, so that a peer that keeps sending cannot hold
/// the event loop. Input may be left then, and no new (edge-triggered) event need come for
/// it (the peer may have sent it all): the caller calls again on its next pass.
const DISCARD_PER_CALL: usize = 256 << 10;

/// Where a lingering connection stands after [`Lingering::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing left to wait for: drop it.
    Done,
    /// Waiting for the socket: a readiness event will come.
    Waiting,
    /// The discard budget ran out with input perhaps left: call again soon.
    Busy,
}

pub struct Lingering {
    sock: Transport,
    /// What is left to write before our side is shut down.
    out: Vec<u8>,
    shut: bool,
    /// The peer may still be sending: wait for it to close. (Not after it sent its WebSocket
    /// Close: once the input there is now has been read, closing resets nothing.)
    wait_for_peer: bool,
    pub until: Instant,
}

impl Lingering {
    pub fn new(sock: Transport, out: Vec<u8>, wait_for_peer: bool, until: Instant) -> Lingering {
        Lingering { sock, out, shut: false, wait_for_peer, until }
    }

    /// Write, shut down, discard as far as the socket lets us now. `Done` when nothing is left
    /// to wait for: the peer closed (or the socket failed); the caller then drops it.
    pub fn progress(&mut self) -> State {
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return State::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return State::Done,
            }
        }
        if !self.shut {
            match self.sock.flush_tls() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return State::Waiting,
                Err(_) => return State::Done,
                Ok(()) => {}
            }
            // (TLS: close_notify first, best effort.)
            let _ = self.sock.shutdown(Shutdown::Write);
            self.shut = true;
        }
        let mut sink = [0u8; 16 << 10];
        let mut read = 0;
        while read < DISCARD_PER_CALL {
            // The raw socket, also under TLS: these bytes are only thrown away.
            match (&mut self.sock.tcp()).read(&mut sink) {
                Ok(0) => return State::Done,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if self.wait_for_peer { State::Waiting } else { State::Done };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return State::Done,
            }
        }
        State::Busy
    }
}
