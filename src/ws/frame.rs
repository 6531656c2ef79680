//! RFC 6455 §5.2 frame headers: decoding, encoding and the XOR mask.
//!
//! Pure functions over byte slices; no allocation. [`decode_header`] validates everything that
//! can be judged from the header alone (reserved bits, opcodes, control-frame rules, masking
//! direction, size limit) so that a caller never buffers a frame it would refuse anyway.

/// Largest header: 2 fixed bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER: usize = 14;

/// Frame opcodes (RFC 6455 §5.2). Reserved values are rejected by [`decode_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Close, Ping and Pong.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close status codes (RFC 6455 §7.4.1) that this crate sends.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;

    /// May this code appear in a Close frame on the wire? (§7.4: 1005, 1006 and 1015 are
    /// reserved for local use; 1016–2999 are unassigned; 3000–4999 are for applications.)
    pub fn is_valid_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A protocol violation: the connection must be failed with this close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    pub const fn protocol(reason: &'static str) -> Self {
        Violation { code: close_code::PROTOCOL_ERROR, reason }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    /// Header length in bytes (2..=14).
    pub header_len: usize,
    pub payload_len: usize,
}

/// Which side's frames are being decoded: a server decodes masked client frames, a client
/// decodes unmasked server frames (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Decode the header at the start of `buf`. `Ok(None)`: not enough bytes yet.
/// `max_payload` bounds data frames; a larger one is a 1009 violation.
pub fn decode_header(buf: &[u8], role: Role, max_payload: usize) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(Violation::protocol("reserved bits set"));
    }
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(Violation::protocol("reserved opcode"))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(Violation::protocol("client frame not masked")),
        (Role::Client, true) => return Err(Violation::protocol("server frame masked")),
        _ => {}
    }
    let len7 = (b1 & 0x7F) as usize;
    if opcode.is_control() && (len7 > 125 || !fin) {
        return Err(Violation::protocol("invalid control frame"));
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(Violation::protocol("64-bit length has its top bit set"));
            }
            (usize::try_from(l).unwrap_or(usize::MAX), 10)
        }
        n => (n, 2),
    };
    if payload_len > max_payload {
        return Err(Violation { code: close_code::TOO_BIG, reason: "frame too big" });
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin, opcode, mask, header_len: pos, payload_len }))
}

/// Length of the header [`encode_header`] writes for this payload length.
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    base + if masked { 4 } else { 0 }
}

/// Write a frame header into `out` (at least [`header_len`] bytes); returns its length.
pub fn encode_header(out: &mut [u8], fin: bool, opcode: Opcode, payload_len: usize, mask: Option<[u8; 4]>) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = match payload_len {
        0..=125 => {
            out[1] = mbit | payload_len as u8;
            2
        }
        126..=65535 => {
            out[1] = mbit | 126;
            out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = mbit | 127;
            out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        }
    };
    if let Some(m) = mask {
        out[pos..pos + 4].copy_from_slice(&m);
        pos += 4;
    }
    pos
}

/// XOR `data` with the 4-byte mask `key` (§5.3), eight bytes at a time.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ k;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, hence of 4: the key phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_mask(data: &mut [u8], key: [u8; 4]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }

    #[test]
    fn rfc_example_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut f = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let h = decode_header(&f, Role::Server, 1000).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.header_len, h.payload_len), (true, Opcode::Text, 6, 5));
        apply_mask(&mut f[6..], h.mask.unwrap());
        assert_eq!(&f[6..], b"Hello");
    }

    #[test]
    fn rejects() {
        let v = |b: &[u8], role| decode_header(b, role, 100).unwrap_err().code;
        assert_eq!(v(&[0xC2, 0x80, 0, 0, 0, 0], Role::Server), 1002); // RSV1
        assert_eq!(v(&[0x83, 0x80, 0, 0, 0, 0], Role::Server), 1002); // opcode 3
        assert_eq!(v(&[0x82, 0x00], Role::Server), 1002); // unmasked from client
        assert_eq!(v(&[0x82, 0x80, 0, 0, 0, 0], Role::Client), 1002); // masked from server
        assert_eq!(v(&[0x09, 0x80, 0, 0, 0, 0], Role::Server), 1002); // fragmented ping
        assert_eq!(v(&[0x89, 0xFE, 0, 126], Role::Server), 1002); // ping > 125
        assert_eq!(v(&[0x82, 0xFE, 0, 101], Role::Server), 1009);
        let mut big = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(v(&big, Role::Server), 1002);
        big[2] = 0;
        big[9] = 1;
        assert_eq!(decode_header(&big, Role::Server, 100).unwrap(), None); // needs mask
    }

    proptest! {
        #[test]
        fn mask_matches_naive(data in proptest::collection::vec(any::<u8>(), 0..100), key: [u8; 4]) {
            let mut a = data.clone();
            let mut b = data;
            apply_mask(&mut a, key);
            naive_mask(&mut b, key);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn header_round_trip(fin: bool, op in 0usize..6, len in 0usize..200_000, key: Option<[u8; 4]>) {
            let ops = [Opcode::Continuation, Opcode::Text, Opcode::Binary, Opcode::Close, Opcode::Ping, Opcode::Pong];
            let opcode = ops[op];
            let len = if opcode.is_control() { len % 126 } else { len };
            let fin = fin || opcode.is_control();
            let mut out = [0u8; MAX_HEADER];
            let n = encode_header(&mut out, fin, opcode, len, key);
            prop_assert_eq!(n, header_len(len, key.is_some()));
            let role = if key.is_some() { Role::Server } else { Role::Client };
            // Every strict prefix is "incomplete", never an error.
            for cut in 0..n {
                prop_assert_eq!(decode_header(&out[..cut], role, usize::MAX).unwrap(), None);
            }
            let h = decode_header(&out[..n], role, usize::MAX).unwrap().unwrap();
            prop_assert_eq!(h, Header { fin, opcode, mask: key, header_len: n, payload_len: len });
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = decode_header(&data, Role::Server, 65549);
            let _ = decode_header(&data, Role::Client, 65549);
        }
    }
}
