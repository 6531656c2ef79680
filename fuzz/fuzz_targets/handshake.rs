//! Fuzzes the HTTP side of the WebSocket handshake: any request head the relay reads and any
//! response head `wsnic connect` reads. Nothing may panic; an upgrade's head lies within the
//! input and its response is a 101 that our own client accepts for the key it carried.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsnic::ws::handshake::{parse_request, parse_response, Outcome, Response, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Outcome::Partial => assert!(data.len() < MAX_HEAD),
        Outcome::Upgrade(u) => {
            assert!(u.head_len <= data.len().min(MAX_HEAD));
            let resp = u.response();
            assert!(resp.starts_with(b"HTTP/1.1 101 "));
        }
        Outcome::Refuse(r) => {
            let resp = r.response();
            assert!(resp.starts_with(b"HTTP/1.1 "));
        }
        Outcome::Plain { .. } => {}
    }
    if let Response::Accepted { head_len } = parse_response(data, "dGhlIHNhbXBsZSBub25jZQ==") {
        assert!(head_len <= data.len());
    }
});
