//! A WebSocket echo server built on wsnic's sans-io WebSocket core (`wsnic::ws`), one thread
//! per connection, for conformance testing with the Autobahn TestSuite cases:
//!
//! ```text
//! cargo run --release --example ws_echo -- 127.0.0.1:9001
//! kosoku -o reports ws://127.0.0.1:9001
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use wsnic::ws::conn::{close_payload, encode_frame};
use wsnic::ws::handshake::{parse_request, Outcome};
use wsnic::ws::{Conn, Item, Opcode, Parsed, Payload, Role};

/// Autobahn's largest messages are 16 MiB.
const MAX_MESSAGE: usize = 64 << 20;

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr)?;
    // Port 0 picks a free port; the line below says which (the conformance test reads it).
    println!("ws_echo listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    // Opening handshake.
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf) {
            Outcome::Partial => continue,
            Outcome::Refuse(r) => return s.write_all(&r.response()),
            Outcome::Plain { .. } => return s.write_all(&wsnic::ws::handshake::plain_http_refusal().response()),
            Outcome::Upgrade(u) => {
                s.write_all(&u.response())?;
                buf.drain(..u.head_len);
                break;
            }
        }
    }
    let mut conn = Conn::new(Role::Server, MAX_MESSAGE);
    let mut out = Vec::new();
    loop {
        let mut pos = 0;
        loop {
            match conn.parse(&mut buf[pos..]) {
                Ok(Parsed::Incomplete { .. }) => break,
                Ok(Parsed::Consumed(n)) => pos += n,
                Ok(Parsed::Item { consumed, item }) => {
                    let base = pos;
                    pos += consumed;
                    let (op, data) = match item {
                        Item::Binary(p) => (Opcode::Binary, payload(&buf, base, &conn, p)),
                        Item::Text(p) => (Opcode::Text, payload(&buf, base, &conn, p)),
                        Item::Ping(r) => (Opcode::Pong, &buf[base..][r]),
                        Item::Pong(_) => continue,
                        Item::Close { code, .. } => {
                            let (p, n) = code.map(|c| close_payload(c, "")).unwrap_or(([0; 125], 0));
                            encode_frame(&mut out, Opcode::Close, &p[..n], None);
                            s.write_all(&out)?;
                            return s.shutdown(Shutdown::Both);
                        }
                    };
                    encode_frame(&mut out, op, data, None);
                    s.write_all(&out)?;
                }
                Err(v) => {
                    let (p, n) = close_payload(v.code, v.reason);
                    encode_frame(&mut out, Opcode::Close, &p[..n], None);
                    s.write_all(&out)?;
                    return s.shutdown(Shutdown::Both);
                }
            }
        }
        buf.drain(..pos);
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn payload<'a>(buf: &'a [u8], base: usize, conn: &'a Conn, p: Payload) -> &'a [u8] {
    match p {
        Payload::InBuf(r) => &buf[base..][r],
        Payload::Assembled => conn.assembled(),
    }
}
