//! Per-connection RFC 6455 message state, sans-io: bytes in, messages out.
//!
//! [`Conn::parse`] takes the caller's input buffer, unmasks complete frames in place and
//! returns one [`Item`] at a time. Unfragmented messages (all that v86 sends) are delivered
//! as ranges of the caller's buffer — no copy, no allocation. Fragments are reassembled in a
//! buffer that exists only while a fragmented message is in flight. Text is validated as
//! UTF-8 incrementally, so an invalid fragment fails the connection at once (1007).

use std::ops::Range;

use super::frame::{self, close_code, decode_header, Header, Opcode, Role, Violation};

/// Where a delivered payload lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// This range of the buffer passed to [`Conn::parse`], already unmasked.
    InBuf(Range<usize>),
    /// In [`Conn::assembled`] (a reassembled fragmented message), until the next `parse`.
    Assembled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Binary(Payload),
    /// A complete, valid UTF-8 text message.
    Text(Payload),
    Ping(Range<usize>),
    Pong(Range<usize>),
    /// The peer's Close: its status code (if any) and reason (valid UTF-8) range.
    Close {
        code: Option<u16>,
        reason: Range<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole frame yet; nothing consumed. `need` is the total length of the frame (or of
    /// the header, while that is incomplete) counted from the start of the buffer, if known.
    Incomplete { need: Option<usize> },
    /// A frame was consumed that yields nothing by itself (a non-final fragment).
    Consumed(usize),
    /// A frame of `consumed` bytes yielded an item.
    Item { consumed: usize, item: Item },
}

struct Fragmented {
    opcode: Opcode,
    data: Vec<u8>,
    /// Text only: bytes of `data` known to be valid UTF-8 (a code point may straddle fragments).
    utf8_valid: usize,
}

/// The receiving half of a WebSocket connection's protocol state.
pub struct Conn {
    role: Role,
    max_message: usize,
    frag: Option<Fragmented>,
    assembled: Vec<u8>,
    close_received: bool,
}

impl Conn {
    /// `role` is this endpoint's role; `max_message` bounds a message's payload (1009 beyond).
    pub fn new(role: Role, max_message: usize) -> Conn {
        Conn { role, max_message, frag: None, assembled: Vec::new(), close_received: false }
    }

    /// The payload of the last [`Payload::Assembled`] item.
    pub fn assembled(&self) -> &[u8] {
        &self.assembled
    }

    /// Has the peer sent its Close frame? Nothing after it is parsed.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// Parse the next frame at the start of `buf`. On `Err`, fail the connection: send a Close
    /// with the violation's code and close the socket.
    pub fn parse(&mut self, buf: &mut [u8]) -> Result<Parsed, Violation> {
        if !self.assembled.is_empty() {
            self.assembled = Vec::new();
        }
        if self.close_received {
            return Ok(Parsed::Incomplete { need: None });
        }
        let Some(h) = decode_header(buf, self.role, self.max_message)? else {
            return Ok(Parsed::Incomplete { need: None });
        };
        let end = h.header_len + h.payload_len;
        if buf.len() < end {
            return Ok(Parsed::Incomplete { need: Some(end) });
        }
        let range = h.header_len..end;
        if let Some(key) = h.mask {
            frame::apply_mask(&mut buf[range.clone()], key);
        }
        let item = self.on_frame(&h, &buf[range.clone()], range)?;
        Ok(match item {
            Some(item) => Parsed::Item { consumed: end, item },
            None => Parsed::Consumed(end),
        })
    }

    fn on_frame(&mut self, h: &Header, payload: &[u8], range: Range<usize>) -> Result<Option<Item>, Violation> {
        match h.opcode {
            Opcode::Ping => Ok(Some(Item::Ping(range))),
            Opcode::Pong => Ok(Some(Item::Pong(range))),
            Opcode::Close => {
                self.close_received = true;
                let (code, reason) = parse_close(payload)?;
                let off = range.start;
                Ok(Some(Item::Close { code, reason: off + reason.start..off + reason.end }))
            }
            Opcode::Text | Opcode::Binary if self.frag.is_some() => {
                Err(Violation::protocol("new message while a fragmented one is unfinished"))
            }
            Opcode::Text | Opcode::Binary if h.fin => {
                if h.opcode == Opcode::Text {
                    std::str::from_utf8(payload).map_err(|_| invalid_utf8())?;
                    Ok(Some(Item::Text(Payload::InBuf(range))))
                } else {
                    Ok(Some(Item::Binary(Payload::InBuf(range))))
                }
            }
            Opcode::Text | Opcode::Binary => {
                let mut f = Fragmented { opcode: h.opcode, data: Vec::with_capacity(payload.len()), utf8_valid: 0 };
                f.push(payload)?;
                self.frag = Some(f);
                Ok(None)
            }
            Opcode::Continuation => {
                let f = self.frag.as_mut().ok_or(Violation::protocol("continuation without a message"))?;
                if f.data.len() + payload.len() > self.max_message {
                    return Err(Violation { code: close_code::TOO_BIG, reason: "message too big" });
                }
                f.push(payload)?;
                if !h.fin {
                    return Ok(None);
                }
                let f = self.frag.take().expect("checked above");
                if f.opcode == Opcode::Text && f.utf8_valid != f.data.len() {
                    return Err(invalid_utf8());
                }
                self.assembled = f.data;
                Ok(Some(if f.opcode == Opcode::Text {
                    Item::Text(Payload::Assembled)
                } else {
                    Item::Binary(Payload::Assembled)
                }))
            }
        }
    }
}

impl Fragmented {
    fn push(&mut self, payload: &[u8]) -> Result<(), Violation> {
        self.data.extend_from_slice(payload);
        if self.opcode == Opcode::Text {
            match std::str::from_utf8(&self.data[self.utf8_valid..]) {
                Ok(_) => self.utf8_valid = self.data.len(),
                // An incomplete sequence at the end may be completed by the next fragment.
                Err(e) if e.error_len().is_none() => self.utf8_valid += e.valid_up_to(),
                Err(_) => return Err(invalid_utf8()),
            }
        }
        Ok(())
    }
}

fn invalid_utf8() -> Violation {
    Violation { code: close_code::INVALID_PAYLOAD, reason: "invalid UTF-8 in text" }
}

/// Split a Close payload into status code and reason (relative range), validating both.
fn parse_close(payload: &[u8]) -> Result<(Option<u16>, Range<usize>), Violation> {
    match payload.len() {
        0 => Ok((None, 0..0)),
        1 => Err(Violation::protocol("close payload of one byte")),
        n => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code::is_valid_on_wire(code) {
                return Err(Violation::protocol("invalid close code"));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| invalid_utf8())?;
            Ok((Some(code), 2..n))
        }
    }
}

/// Encode a complete frame with `payload` into `out` (cleared first); masked when `mask` is
/// given (client role). For control frames and tests; the relay's data path writes headers
/// in place instead.
pub fn encode_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.clear();
    let mut h = [0u8; frame::MAX_HEADER];
    let n = frame::encode_header(&mut h, true, opcode, payload.len(), mask);
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        frame::apply_mask(&mut out[start..], m);
    }
}

/// The payload of a Close frame: status code and reason (truncated to fit 125 bytes at a
/// character boundary).
pub fn close_payload(code: u16, reason: &str) -> ([u8; 125], usize) {
    let mut p = [0u8; 125];
    p[..2].copy_from_slice(&code.to_be_bytes());
    let mut r = reason.len().min(123);
    while !reason.is_char_boundary(r) {
        r -= 1;
    }
    p[2..2 + r].copy_from_slice(&reason.as_bytes()[..r]);
    (p, 2 + r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn masked(opcode: Opcode, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut h = [0u8; 14];
        let n = frame::encode_header(&mut h, fin, opcode, payload.len(), Some(key));
        let mut v = h[..n].to_vec();
        let s = v.len();
        v.extend_from_slice(payload);
        frame::apply_mask(&mut v[s..], key);
        v
    }

    /// Feed `bytes` and collect (item, payload bytes) until incomplete or error.
    fn run(conn: &mut Conn, bytes: &mut [u8]) -> Result<Vec<(Item, Vec<u8>)>, Violation> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            match conn.parse(&mut bytes[pos..])? {
                Parsed::Incomplete { .. } => return Ok(out),
                Parsed::Consumed(n) => pos += n,
                Parsed::Item { consumed, item } => {
                    let data = match &item {
                        Item::Binary(Payload::InBuf(r)) | Item::Text(Payload::InBuf(r)) => {
                            bytes[pos..][r.clone()].to_vec()
                        }
                        Item::Binary(Payload::Assembled) | Item::Text(Payload::Assembled) => conn.assembled().to_vec(),
                        Item::Ping(r) | Item::Pong(r) => bytes[pos..][r.clone()].to_vec(),
                        Item::Close { reason, .. } => bytes[pos..][reason.clone()].to_vec(),
                    };
                    out.push((item, data));
                    pos += consumed;
                }
            }
        }
    }

    #[test]
    fn binary_in_place_and_incomplete() {
        let mut c = Conn::new(Role::Server, 65549);
        let f = masked(Opcode::Binary, true, b"\x01\x02\x03", [9, 8, 7, 6]);
        for cut in 0..f.len() {
            let mut part = f[..cut].to_vec();
            assert!(matches!(c.parse(&mut part).unwrap(), Parsed::Incomplete { .. }));
        }
        let mut all = f.clone();
        let got = run(&mut c, &mut all).unwrap();
        assert_eq!(got, vec![(Item::Binary(Payload::InBuf(6..9)), vec![1, 2, 3])]);
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut c = Conn::new(Role::Server, 100);
        let k = [1, 2, 3, 4];
        let mut b = masked(Opcode::Binary, false, b"ab", k);
        b.extend(masked(Opcode::Ping, true, b"p", k));
        b.extend(masked(Opcode::Continuation, false, b"cd", k));
        b.extend(masked(Opcode::Continuation, true, b"e", k));
        let got = run(&mut c, &mut b).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, b"p");
        assert_eq!(got[1], (Item::Binary(Payload::Assembled), b"abcde".to_vec()));
    }

    #[test]
    fn violations() {
        let k = [5, 6, 7, 8];
        let code = |frames: Vec<Vec<u8>>, max| {
            let mut c = Conn::new(Role::Server, max);
            let mut b: Vec<u8> = frames.concat();
            run(&mut c, &mut b).unwrap_err().code
        };
        assert_eq!(code(vec![masked(Opcode::Continuation, true, b"x", k)], 100), 1002);
        assert_eq!(code(vec![masked(Opcode::Text, false, b"a", k), masked(Opcode::Text, true, b"b", k)], 100), 1002);
        assert_eq!(code(vec![masked(Opcode::Text, true, b"\xff", k)], 100), 1007);
        // Invalid UTF-8 fails on the fragment that contains it, before the message ends.
        assert_eq!(code(vec![masked(Opcode::Text, false, b"ok\xc0\xaf", k)], 100), 1007);
        assert_eq!(
            code(
                vec![masked(Opcode::Binary, false, &[0; 60], k), masked(Opcode::Continuation, true, &[0; 41], k)],
                100
            ),
            1009
        );
        assert_eq!(code(vec![masked(Opcode::Close, true, b"\x03", k)], 100), 1002);
        assert_eq!(code(vec![masked(Opcode::Close, true, &[0x03, 0xed], k)], 100), 1002); // 1005
        assert_eq!(code(vec![masked(Opcode::Close, true, b"\x03\xe8\xff", k)], 100), 1007);
    }

    #[test]
    fn split_code_point_across_fragments() {
        let mut c = Conn::new(Role::Server, 100);
        let k = [0; 4];
        let euro = "€".as_bytes();
        let mut b = masked(Opcode::Text, false, &euro[..1], k);
        b.extend(masked(Opcode::Continuation, true, &euro[1..], k));
        let got = run(&mut c, &mut b).unwrap();
        assert_eq!(got[0], (Item::Text(Payload::Assembled), euro.to_vec()));
    }

    #[test]
    fn close_then_nothing() {
        let mut c = Conn::new(Role::Server, 100);
        let mut b = masked(Opcode::Close, true, b"\x03\xe8bye", [1, 1, 1, 1]);
        b.extend(masked(Opcode::Binary, true, b"late", [1, 1, 1, 1]));
        let got = run(&mut c, &mut b).unwrap();
        assert_eq!(got, vec![(Item::Close { code: Some(1000), reason: 8..11 }, b"bye".to_vec())]);
        assert!(c.close_received());
    }

    #[test]
    fn close_payload_truncates_at_char_boundary() {
        let long = "é".repeat(100);
        let (p, n) = close_payload(1000, &long);
        assert!(n <= 125);
        assert!(std::str::from_utf8(&p[2..n]).is_ok());
    }

    proptest! {
        /// A message split into any fragment sizes, with the stream cut at any points,
        /// comes out whole and identical.
        #[test]
        fn fragmentation_round_trip(msg in proptest::collection::vec(any::<u8>(), 0..300), sizes in proptest::collection::vec(1usize..50, 1..10), key: [u8; 4]) {
            let mut frames = Vec::new();
            let mut rest = &msg[..];
            let mut first = true;
            let mut i = 0;
            loop {
                let n = sizes[i % sizes.len()].min(rest.len());
                let fin = n == rest.len();
                let op = if first { Opcode::Binary } else { Opcode::Continuation };
                frames.extend(masked(op, fin, &rest[..n], key));
                rest = &rest[n..];
                first = false;
                i += 1;
                if fin { break; }
            }
            let mut c = Conn::new(Role::Server, 1000);
            let got = run(&mut c, &mut frames).unwrap();
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(&got[0].1, &msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut c = Conn::new(Role::Server, 100);
            let _ = run(&mut c, &mut data);
        }
    }
}
