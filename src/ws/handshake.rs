//! RFC 6455 §4 opening handshake, sans-io. Server side: request head bytes in, a decision
//! and the response bytes out. Client side (`wsnic connect`): the request bytes, and the
//! server's response head judged.
//!
//! Any path is accepted; of the subprotocols a client offers one is named back
//! ([`choose_protocol`]); no extension (permessage-deflate) is negotiated. A request without `Upgrade: websocket` is plain HTTP and
//! gets a short text answer naming the server.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest request head accepted; a longer one is refused with 400.
pub const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 64;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes of the request head (anything after it belongs to the WebSocket stream).
    pub head_len: usize,
    /// The request target (path and query), as sent.
    pub target: String,
    pub origin: Option<String>,
    pub forwarded_for: Option<String>,
    /// The `Sec-WebSocket-Accept` value for this request's key.
    pub accept: String,
    /// The subprotocol to name in the response: one the client offered (see
    /// [`choose_protocol`]). The frames are the same whatever it is called.
    pub protocol: Option<String>,
}

impl Upgrade {
    /// The `101 Switching Protocols` response.
    pub fn response(&self) -> Vec<u8> {
        let protocol = self.protocol.as_ref().map_or(String::new(), |p| format!("Sec-WebSocket-Protocol: {p}\r\n"));
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
            self.accept
        )
        .into_bytes()
    }
}

/// The subprotocol to accept from those a client offers (all its `Sec-WebSocket-Protocol`
/// values). wsnic speaks none in particular — every binary message is one frame — but a
/// browser that offered any fails the connection unless the server names one of them
/// (websockify-style clients offer `binary`). So: `binary` if offered, else the first
/// offered except `base64` (websockify's text encoding, which wsnic does not speak), else
/// none.
pub fn choose_protocol<'a>(offered: impl Iterator<Item = &'a str>) -> Option<String> {
    let is_token =
        |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    let offered: Vec<&str> = offered.flat_map(|v| v.split(',')).map(str::trim).filter(|t| is_token(t)).collect();
    offered
        .iter()
        .find(|t| t.eq_ignore_ascii_case("binary"))
        .or_else(|| offered.iter().find(|t| !t.eq_ignore_ascii_case("base64")))
        .map(|t| t.to_string())
}

/// A request answered with an HTTP response and then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub headers: &'static str,
    pub body: String,
}

impl Refusal {
    pub fn new(status: u16, body: impl Into<String>) -> Refusal {
        Refusal { status, reason: status_text(status), headers: "", body: body.into() }
    }

    pub fn response(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} {}\r\nServer: wsnic\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{}",
            self.status,
            self.reason,
            self.body.len(),
            self.headers,
            self.body
        )
        .into_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The head is not complete yet: read more.
    Partial,
    Upgrade(Upgrade),
    Refuse(Refusal),
    /// A plain HTTP GET (no upgrade) for `path`: the relay answers its status paths, and
    /// anything else with [`plain_http_refusal`]. `proxied`: it carries a header a proxy
    /// adds (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`), so the TCP peer is not the client.
    Plain {
        path: String,
        forwarded_for: Option<String>,
        proxied: bool,
    },
}

/// A complete `200 OK`-style response with `body`.
pub fn http_response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 {status} {}\r\nServer: wsnic\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        if status == 200 { "OK" } else { status_text(status) },
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The answer to a plain HTTP request that is not for a status path: 426 with a short text.
pub fn plain_http_refusal() -> Refusal {
    let mut r = Refusal::new(426, PLAIN_HTTP_BODY);
    r.headers = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n";
    r
}

/// Text sent to a plain HTTP request.
pub const PLAIN_HTTP_BODY: &str =
    "wsnic: WebSocket to TAP relay. This endpoint expects a WebSocket upgrade (ws://HOST:PORT/), e.g. v86's network_relay_url.\n";

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false)
}

/// `Sec-WebSocket-Accept` for a client key (§4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Judge the request head at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Outcome {
    let bad = |why: &str| Outcome::Refuse(Refusal::new(400, format!("wsnic: bad request: {why}\n")));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(&buf[..buf.len().min(MAX_HEAD)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Outcome::Partial,
        Ok(httparse::Status::Partial) => return bad("request head larger than 8 KiB"),
        Err(e) => return bad(&format!("malformed request head ({e})")),
    };
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let text = |name: &str| header(name).and_then(|v| std::str::from_utf8(v).ok()).map(|s| s.trim().to_string());
    // Every line of a header, in order (some proxies add a line instead of appending).
    let all = |name: &str| -> Vec<&str> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .collect()
    };
    let forwarded_for = {
        let lines = all("x-forwarded-for");
        (!lines.is_empty()).then(|| lines.join(", "))
    };

    if !header("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        if req.method == Some("GET") {
            let proxied = ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|h| header(h).is_some());
            return Outcome::Plain { path: req.path.unwrap_or("/").to_string(), forwarded_for, proxied };
        }
        let mut r = Refusal::new(426, PLAIN_HTTP_BODY);
        r.headers = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n";
        return Outcome::Refuse(r);
    }
    if req.method != Some("GET") {
        return Outcome::Refuse(Refusal::new(405, "wsnic: a WebSocket upgrade must use GET\n"));
    }
    if req.version != Some(1) {
        return bad("a WebSocket upgrade needs HTTP/1.1");
    }
    if header("host").is_none() {
        return bad("missing Host header");
    }
    if !header("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return bad("Connection header lacks \"Upgrade\"");
    }
    if text("sec-websocket-version").as_deref() != Some("13") {
        let mut r = Refusal::new(426, "wsnic: only WebSocket version 13 is supported\n");
        r.headers = "Sec-WebSocket-Version: 13\r\n";
        return Outcome::Refuse(r);
    }
    let Some(key) = text("sec-websocket-key") else {
        return bad("missing Sec-WebSocket-Key");
    };
    match base64::engine::general_purpose::STANDARD.decode(&key) {
        Ok(k) if k.len() == 16 => {}
        _ => return bad("Sec-WebSocket-Key is not 16 bytes of base64"),
    }
    Outcome::Upgrade(Upgrade {
        head_len,
        target: req.path.unwrap_or("/").to_string(),
        origin: text("origin"),
        forwarded_for,
        accept: accept_key(&key),
        protocol: choose_protocol(all("sec-websocket-protocol").into_iter()),
    })
}

/// The client's upgrade request for `target` on `host` (the Host header, with port).
/// `key` is 16 random bytes, base64-encoded.
pub fn client_request(host: &str, target: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wsnic/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// How a server answered [`client_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Partial,
    /// Upgraded; WebSocket bytes start at `head_len`.
    Accepted {
        head_len: usize,
    },
    /// An HTTP answer other than 101: its status line.
    Refused {
        status: u16,
        reason: String,
    },
    /// A 101 that breaks the protocol, or not HTTP at all.
    Invalid(String),
}

/// Judge the server's response head at the start of `buf`, for the request sent with `key`.
pub fn parse_response(buf: &[u8], key: &str) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&buf[..buf.len().min(MAX_HEAD)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Response::Partial,
        Ok(httparse::Status::Partial) => return Response::Invalid("response head larger than 8 KiB".into()),
        Err(e) => return Response::Invalid(format!("not an HTTP response ({e})")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Response::Refused { status, reason: resp.reason.unwrap_or("").to_string() };
    }
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if !header("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Response::Invalid("101 without Upgrade: websocket".into());
    }
    if !header("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Response::Invalid("101 without Connection: Upgrade".into());
    }
    if header("sec-websocket-accept").map(|v| v.trim_ascii()) != Some(accept_key(key).as_bytes()) {
        return Response::Invalid("wrong Sec-WebSocket-Accept".into());
    }
    if header("sec-websocket-extensions").is_some() || header("sec-websocket-protocol").is_some() {
        return Response::Invalid("server selected an extension or subprotocol that was not offered".into());
    }
    Response::Accepted { head_len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "GET /any/path?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\nSec-WebSocket-Extensions: permessage-deflate\r\nOrigin: https://copy.sh\r\n\r\n";

    fn status(req: &str) -> u16 {
        match parse_request(req.as_bytes()) {
            Outcome::Refuse(r) => r.status,
            o => panic!("expected refusal, got {o:?}"),
        }
    }

    #[test]
    fn accepts_rfc_example_key_and_names_the_subprotocol() {
        let Outcome::Upgrade(u) = parse_request(&[GOOD.as_bytes(), &[0x82, 0x80]].concat()) else { panic!() };
        assert_eq!(u.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(u.head_len, GOOD.len());
        assert_eq!(u.target, "/any/path?x=1");
        assert_eq!(u.origin.as_deref(), Some("https://copy.sh"));
        let resp = String::from_utf8(u.response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 "));
        assert!(!resp.contains("Extensions"));
        // A browser that offered subprotocols needs one named back.
        assert!(resp.contains("\r\nSec-WebSocket-Protocol: binary\r\n\r\n"), "{resp}");
        let none = GOOD.replace("Sec-WebSocket-Protocol: binary\r\n", "");
        let Outcome::Upgrade(u) = parse_request(none.as_bytes()) else { panic!() };
        assert!(!String::from_utf8(u.response()).unwrap().contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn a_subprotocol_offered_is_named_back() {
        let pick = |lines: &[&str]| choose_protocol(lines.iter().copied());
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&["base64, binary"]), Some("binary".into()));
        assert_eq!(pick(&["chat", "Binary"]), Some("Binary".into()));
        assert_eq!(pick(&["v86, chat"]), Some("v86".into()));
        assert_eq!(pick(&["base64"]), None, "websockify's text encoding is not spoken");
        assert_eq!(pick(&["a b, (x), , ok"]), Some("ok".into()), "only tokens");
    }

    #[test]
    fn every_forwarded_for_line_counts() {
        let req = GOOD.replace("\r\n\r\n", "\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n");
        let Outcome::Upgrade(u) = parse_request(req.as_bytes()) else { panic!() };
        assert_eq!(u.forwarded_for.as_deref(), Some("6.6.6.6, 1.2.3.4"));
    }

    #[test]
    fn partial_until_blank_line() {
        for cut in 0..GOOD.len() {
            assert_eq!(parse_request(&GOOD.as_bytes()[..cut]), Outcome::Partial, "cut {cut}");
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse_request(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"),
            Outcome::Plain { path: "/x".into(), forwarded_for: None, proxied: false }
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 1.2.3.4\r\n\r\n"),
            Outcome::Plain { path: "/".into(), forwarded_for: None, proxied: true }
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"),
            Outcome::Plain { path: "/".into(), forwarded_for: Some("1.2.3.4".into()), proxied: true }
        );
        assert_eq!(status("POST / HTTP/1.1\r\nHost: h\r\n\r\n"), 426);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status(&GOOD.replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")), 400);
        assert_eq!(status(&GOOD.replace("Host: h\r\n", "")), 400);
        assert_eq!(status("GARBAGE\x01\r\n\r\n"), 400);
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&huge), 400);
        assert_eq!(status(&huge[..MAX_HEAD + 10]), 400); // no end in sight
    }

    #[test]
    fn plain_http_names_server() {
        let text = String::from_utf8(plain_http_refusal().response()).unwrap();
        assert!(text.contains("426 Upgrade Required") && text.contains("wsnic") && text.contains("WebSocket"));
        assert!(text.ends_with(PLAIN_HTTP_BODY));
    }

    #[test]
    fn client_side_round_trip() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = client_request("relay:8070", "/x", key);
        let Outcome::Upgrade(u) = parse_request(&req) else { panic!() };
        assert_eq!(u.target, "/x");
        let mut resp = u.response();
        let n = resp.len();
        resp.extend_from_slice(&[0x82, 0x00]);
        assert_eq!(parse_response(&resp, key), Response::Accepted { head_len: n });
        for cut in 0..n {
            assert_eq!(parse_response(&resp[..cut], key), Response::Partial);
        }
        assert!(matches!(parse_response(&u.response(), "b3RoZXIga2V5IDE2IGJ5dA=="), Response::Invalid(_)));
        let refused = Refusal::new(403, "no\n").response();
        assert_eq!(parse_response(&refused, key), Response::Refused { status: 403, reason: "Forbidden".into() });
        assert!(matches!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", key), Response::Invalid(_)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&data);
            let _ = parse_response(&data, "dGhlIHNhbXBsZSBub25jZQ==");
        }
    }
}
