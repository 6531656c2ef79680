//! Fuzzes the WebSocket receive core (`ws::Conn::parse`) as a pipe drives it. Input: a byte
//! choosing the role and the message limit, a byte choosing where the stream is cut, then the
//! stream. Nothing may panic; every consumed length and every range must lie within what was
//! given; text must be valid UTF-8 and a message within the limit; and the stream cut in two
//! (the second part arriving once the first is parsed as far as it goes) must yield the same
//! items, with the same bytes, and end the same way, as when it arrives whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsnic::ws::{Conn, Item, Parsed, Payload, Role};

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Binary(Vec<u8>),
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, Vec<u8>),
    /// The connection failed with this close code.
    Failed(u16),
}

/// Parse `buf[*start..]` as far as it goes; `Err` once the connection has failed.
fn drain(conn: &mut Conn, buf: &mut [u8], start: &mut usize, max: usize, seen: &mut Vec<Seen>) -> Result<(), ()> {
    loop {
        let rest = &mut buf[*start..];
        let len = rest.len();
        match conn.parse(rest) {
            Ok(Parsed::Incomplete { need }) => {
                if let Some(n) = need {
                    assert!(n > len, "incomplete, yet {n} of {len} bytes are needed");
                }
                return Ok(());
            }
            Ok(Parsed::Consumed(n)) => {
                assert!(n > 0 && n <= len);
                *start += n;
            }
            Ok(Parsed::Item { consumed, item }) => {
                assert!(consumed > 0 && consumed <= len);
                let rest = &buf[*start..*start + consumed];
                let bytes = |p: &Payload, conn: &Conn| match p {
                    Payload::InBuf(r) => rest[r.clone()].to_vec(),
                    Payload::Assembled => conn.assembled().to_vec(),
                };
                let s = match &item {
                    Item::Binary(p) => Seen::Binary(bytes(p, conn)),
                    Item::Text(p) => {
                        let b = bytes(p, conn);
                        assert!(std::str::from_utf8(&b).is_ok());
                        Seen::Text(b)
                    }
                    Item::Ping(r) => Seen::Ping(rest[r.clone()].to_vec()),
                    Item::Pong(r) => Seen::Pong(rest[r.clone()].to_vec()),
                    Item::Close { code, reason } => {
                        assert!(std::str::from_utf8(&rest[reason.clone()]).is_ok());
                        Seen::Close(*code, rest[reason.clone()].to_vec())
                    }
                };
                match &s {
                    Seen::Binary(b) | Seen::Text(b) => assert!(b.len() <= max),
                    Seen::Ping(b) | Seen::Pong(b) | Seen::Close(_, b) => assert!(b.len() <= 125),
                    Seen::Failed(_) => {}
                }
                seen.push(s);
                *start += consumed;
            }
            Err(v) => {
                seen.push(Seen::Failed(v.code));
                return Err(());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, cut, stream @ ..] = data else { return };
    let role = if mode & 1 == 0 { Role::Server } else { Role::Client };
    let max = 1usize << (mode >> 1 & 15);
    let cut = usize::from(*cut) * stream.len() / 255;

    let mut whole = Vec::new();
    let mut buf = stream.to_vec();
    let mut start = 0;
    let _ = drain(&mut Conn::new(role, max), &mut buf, &mut start, max, &mut whole);

    let mut split = Vec::new();
    let mut conn = Conn::new(role, max);
    let mut buf = stream[..cut].to_vec();
    let mut start = 0;
    if drain(&mut conn, &mut buf, &mut start, max, &mut split).is_ok() {
        buf.extend_from_slice(&stream[cut..]);
        let _ = drain(&mut conn, &mut buf, &mut start, max, &mut split);
    }
    assert_eq!(whole, split, "cut at {cut}");
});
