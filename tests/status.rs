//! The operator's view over plain HTTP on the WebSocket port: /healthz, /metrics (parsed by
//! the Prometheus project's own Python parser, `prometheus_client`), the status page, and
//! `status_allow` (also behind a proxy); and a real browser (headless Chromium) opening a WebSocket.

mod support;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::Duration;

use support::{frames, Guest, Netns, Wsnic};

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);

fn get(ns: &Netns, path: &str) -> (u16, String) {
    get_with(ns, path, "")
}

/// GET `path` with extra header lines `headers` (each ending in CRLF).
fn get_with(ns: &Netns, path: &str, headers: &str) -> (u16, String) {
    let mut s = ns.tcp("127.0.0.1:8070");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Parse with prometheus_client and return `name{labels}` → value for wsnic's samples.
fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
                  for f in p(sys.stdin.read()):\n  for s in f.samples:\n    \
                  l=','.join(f'{k}={v}' for k,v in sorted(s.labels.items()))\n    print(f'{s.name}{{{l}}} {s.value}')\n";
    let mut c = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// Headless Chromium (Debian's `chromium`) in `ns` with a fresh profile `profile`, as the probe
/// of this machine runs it: `extra` arguments, then `url`.
fn chromium(ns: &Netns, profile: &std::path::Path, extra: &[&str], url: &str) -> std::process::Output {
    ns.cmd("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium (Debian package `chromium`)")
}

#[test]
fn healthz_metrics_and_status_page() {
    let ns = Netns::new("status");
    let _w = Wsnic::start(&ns, &[]);
    assert_eq!(get(&ns, "/healthz"), (200, "ok\n".to_string()));

    let mut g = Guest::connect(&ns, [2, 0, 0x5e, 0x20, 0, 1], Ipv4Addr::UNSPECIFIED);
    let ip = g.dhcp(1).unwrap();
    let gw = g.arp(GW);
    let (status, text) = get(&ns, "/metrics");
    assert_eq!(status, 200);
    let before = parse_metrics(&text);
    assert_eq!(before["wsnic_clients{}"], 1.0);
    assert!(before["wsnic_dhcp_messages_total{type=discover}"] >= 1.0);
    assert_eq!(before["wsnic_dhcp_pool_addresses{}"], 253.0); // .2 to .254
    for seq in 1..=10 {
        g.send(frames::icmp_echo(8, g.mac, gw, ip, GW, 9, seq, b"count me"));
        assert!(g.recv_until(Duration::from_secs(5), |f| frames::icmp_of(f) == Some((GW, ip, 0, 9, seq))).is_some());
    }
    let after = parse_metrics(&get(&ns, "/metrics").1);
    let moved = |k: &str| after[k] - before[k];
    assert!(moved("wsnic_frames_total{direction=client_to_tap}") >= 10.0, "{after:?}");
    assert!(moved("wsnic_frames_total{direction=tap_to_client}") >= 10.0);
    assert!(moved("wsnic_bytes_total{direction=client_to_tap}") >= 10.0 * 50.0); // 50-byte echo frames

    let (status, page) = get(&ns, "/");
    assert_eq!(status, 200);
    assert!(page.contains("wsnic0") && page.contains(&ip.to_string()) && page.contains("02:00:5e:20:00:01"), "{page}");
    assert!(page.contains("<h2>DHCP leases</h2>"));
    assert_eq!(get(&ns, "/elsewhere").0, 426, "other paths: the WebSocket relay text");
}

#[test]
fn status_allow_restricts_status_and_metrics() {
    let ns = Netns::new("statusallow");
    let _w = Wsnic::start(&ns, &["--status-allow", "10.0.0.0/8"]);
    assert_eq!(get(&ns, "/").0, 403);
    assert_eq!(get(&ns, "/metrics").0, 403);
    assert_eq!(get(&ns, "/healthz").0, 200);
}

/// Behind a reverse proxy on the same host every request comes from loopback, which
/// `status_allow` lets in by default: a request a proxy forwarded (it carries X-Forwarded-For,
/// Forwarded or X-Real-IP) is judged by the client a trusted proxy names, and refused when no
/// trusted proxy names one.
#[test]
fn status_through_a_proxy_is_judged_by_the_client() {
    let ns = Netns::new("statusproxy");
    let mut w = Wsnic::start(&ns, &[]);
    assert_eq!(get(&ns, "/").0, 200, "loopback itself");
    for h in ["X-Forwarded-For: 203.0.113.9\r\n", "X-Real-IP: 203.0.113.9\r\n", "Forwarded: for=203.0.113.9\r\n"] {
        assert_eq!(get_with(&ns, "/", h).0, 403, "{h}: the proxy is not trusted");
        assert_eq!(get_with(&ns, "/metrics", h).0, 403, "{h}");
    }
    assert_eq!(get_with(&ns, "/healthz", "X-Forwarded-For: 203.0.113.9\r\n").0, 200);
    // The token as a path never reaches the log.
    assert_eq!(get(&ns, "/s3cret-token").0, 426);
    w.wait_log("HTTP GET /<path>", Duration::from_secs(5));
    assert!(!w.log_text().contains("s3cret"), "{}", w.log_text());
    drop(w);

    let _w = Wsnic::start(&ns, &["--trusted-proxies", "127.0.0.1"]);
    assert_eq!(get_with(&ns, "/", "X-Forwarded-For: 203.0.113.9\r\n").0, 403, "a remote client");
    assert_eq!(get_with(&ns, "/", "X-Forwarded-For: 127.0.0.1\r\n").0, 200, "a client on the proxy's host");
    assert_eq!(get_with(&ns, "/", "X-Real-IP: 127.0.0.1\r\n").0, 403, "no X-Forwarded-For: client unknown");
    assert_eq!(get_with(&ns, "/", "X-Forwarded-For: 203.0.113.9:51234\r\n").0, 403, "an address with a port");
    assert_eq!(get_with(&ns, "/", "X-Forwarded-For: unknown\r\n").0, 403, "unreadable: not the proxy's own");
}

/// The status page in a real headless Chromium (Debian's `chromium`), inside the relay's
/// namespace: the DOM it builds shows the connected client, and it renders to a screenshot.
/// `WSNIC_SCREENSHOT=path` keeps the picture (docs/status-page.png was made that way).
#[test]
fn status_page_in_headless_chromium() {
    let ns = Netns::new("chromium");
    let _w = Wsnic::start(&ns, &[]);
    let mut g = Guest::connect(&ns, [2, 0, 0x5e, 0x20, 0, 2], Ipv4Addr::UNSPECIFIED);
    let ip = g.dhcp(1).unwrap();
    let profile = std::env::temp_dir().join(format!("{}-profile", ns.name));
    let shot = std::env::var("WSNIC_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("{}.png", ns.name)));
    let dom = chromium(&ns, &profile, &["--hide-scrollbars", "--dump-dom"], "http://127.0.0.1:8070/");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<table id=\"clients\">") || dom.contains("id=\"clients\""), "{dom}");
    assert!(dom.contains("wsnic0") && dom.contains(&ip.to_string()), "the client is not on the page: {dom}");
    let out = chromium(
        &ns,
        &profile,
        &["--hide-scrollbars", &format!("--screenshot={}", shot.display()), "--window-size=1100,520"],
        "http://127.0.0.1:8070/",
    );
    let png =
        std::fs::read(&shot).unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{} bytes", png.len());
    let _ = std::fs::remove_dir_all(&profile);
}

/// A browser page that offers subprotocols (websockify-style clients offer `binary`) is
/// connected: Chromium fails the connection unless the server names one of them.
///
/// `--dump-dom` prints the page once it has loaded, which does not wait for a WebSocket; so
/// the page holds its load event with an image that a little server here answers only once
/// the page has reported the WebSocket's outcome (or after 10 s).
#[test]
fn a_browser_offering_a_subprotocol_connects() {
    let ns = Netns::new("chromiumws");
    let _w = Wsnic::start(&ns, &[]);
    let page = std::env::temp_dir().join(format!("{}.html", ns.name));
    std::fs::write(
        &page,
        "<!doctype html><body><script>\n\
         const done = (what) => { document.body.setAttribute('data-ws', what);\n\
           fetch('http://127.0.0.1:8099/done', { mode: 'no-cors' }).catch(() => {}); };\n\
         const ws = new WebSocket('ws://127.0.0.1:8070/', ['binary']);\n\
         ws.onopen = () => { done('open ' + ws.protocol); ws.close(); };\n\
         ws.onerror = () => done('failed');\n\
         </script><img src=\"http://127.0.0.1:8099/hold\"></body>",
    )
    .unwrap();
    let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:8099").expect("bind 8099"));
    let holder = std::thread::spawn(move || hold_until_done(listener, Duration::from_secs(10)));
    let profile = std::env::temp_dir().join(format!("{}-profile", ns.name));
    let out = chromium(&ns, &profile, &["--dump-dom"], &format!("file://{}", page.display()));
    let reported = holder.join().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&page);
    assert!(dom.contains("data-ws=\"open binary\""), "reported: {reported}\n{dom}");
}

/// Serve `listener`: hold every request until one for `/done` comes (or `limit` passes), then
/// answer them all. Returns whether `/done` came.
fn hold_until_done(listener: std::net::TcpListener, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    listener.set_nonblocking(true).unwrap();
    let (mut held, mut done) = (Vec::new(), false);
    while !done && std::time::Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut head = [0u8; 512];
                let n = s.read(&mut head).unwrap_or(0);
                done |= head[..n].starts_with(b"GET /done ");
                held.push(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for mut s in held {
        let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
    done
}
