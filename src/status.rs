//! What the relay shows about itself, pure: a snapshot of its state rendered as the status
//! page (HTML without external assets) and as Prometheus text metrics.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::relay::pipe::Stats;
use crate::sys::format_mac;

#[derive(Debug, Clone, Default)]
pub struct ClientRow {
    pub peer: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub ip: Option<Ipv4Addr>,
    pub connected_secs: u64,
    pub stats: Stats,
}

#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub hostname: String,
    /// Seconds until it expires (negative: expired).
    pub expires_in: i64,
    pub connected: bool,
}

/// Everything the page and the metrics show, taken in one go by the event loop.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub uptime_secs: u64,
    pub clients: Vec<ClientRow>,
    pub leases: Vec<LeaseRow>,
    /// Frames, bytes and drops of every connection since start (closed ones and live ones).
    pub totals: Stats,
    pub connections_total: u64,
    pub refused: Vec<(&'static str, u64)>,
    pub policy_drops: Vec<(&'static str, u64)>,
    pub dhcp_messages: Vec<(&'static str, u64)>,
    /// DHCP pool (addresses, free), when the built-in server runs.
    pub pool: Option<(usize, usize)>,
    pub config: Vec<(&'static str, String)>,
}

fn esc(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut o, c| {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
        o
    })
}

fn duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d{:02}h", secs / 86400, secs / 3600 % 24),
    }
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut i) = (n as f64, 0);
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The status page.
pub fn html(s: &Snapshot) -> String {
    let mut h = String::with_capacity(4096 + 300 * s.clients.len());
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>wsnic status</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
         td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}th{{background:#f0f0f0}}td.n{{text-align:right}}\
         h1{{font-size:1.4em}}h2{{font-size:1.1em;margin-top:1.5em}}</style></head><body>\
         <h1>wsnic {}</h1><p>Up {} &middot; {} client{} &middot; {} connection{} since start</p>",
        env!("CARGO_PKG_VERSION"),
        duration(s.uptime_secs),
        s.clients.len(),
        if s.clients.len() == 1 { "" } else { "s" },
        s.connections_total,
        if s.connections_total == 1 { "" } else { "s" }
    );
    h.push_str("<h2>Clients</h2><table id=clients><tr><th>Peer</th><th>TAP</th><th>MAC</th><th>IP</th><th>Connected for</th><th>Client → net</th><th>Net → client</th><th>Dropped</th></tr>");
    for c in &s.clients {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{} frames, {}</td><td class=n>{} frames, {}</td><td class=n>{}</td></tr>",
            esc(&c.peer),
            esc(&c.tap),
            c.mac.map_or("–".into(), |m| format_mac(&m)),
            c.ip.map_or("–".into(), |ip| ip.to_string()),
            duration(c.connected_secs),
            c.stats.to_tap_frames,
            bytes(c.stats.to_tap_bytes),
            c.stats.to_ws_frames,
            bytes(c.stats.to_ws_bytes),
            c.stats.drops()
        );
    }
    h.push_str("</table>");
    if let Some((size, free)) = s.pool {
        let _ = write!(h, "<h2>DHCP leases</h2><p>Pool: {size} addresses, {free} free</p>");
        h.push_str(
            "<table id=leases><tr><th>IP</th><th>MAC</th><th>Host name</th><th>Expires in</th><th>Client</th></tr>",
        );
        for l in &s.leases {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                l.ip,
                format_mac(&l.mac),
                esc(&l.hostname),
                if l.expires_in < 0 { "expired".into() } else { duration(l.expires_in as u64) },
                if l.connected { "connected" } else { "gone" }
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Configuration</h2><table id=config>");
    for (k, v) in &s.config {
        let _ = write!(h, "<tr><th>{k}</th><td>{}</td></tr>", esc(v));
    }
    h.push_str("</table></body></html>\n");
    h
}

/// Prometheus text exposition format 0.0.4.
pub fn metrics(s: &Snapshot) -> String {
    let mut m = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(m, "{name}{labels} {v}");
        }
    };
    let plain = |v: u64| vec![(String::new(), v)];
    let by = |label: &str, pairs: &[(&str, u64)]| {
        pairs.iter().map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), *v)).collect::<Vec<_>>()
    };
    let t = &s.totals;
    family("wsnic_uptime_seconds", "gauge", "Seconds since wsnic started.", &plain(s.uptime_secs));
    family("wsnic_clients", "gauge", "Connected WebSocket clients.", &plain(s.clients.len() as u64));
    family("wsnic_connections_total", "counter", "Clients accepted since start.", &plain(s.connections_total));
    family("wsnic_handshakes_refused_total", "counter", "Handshakes refused, by reason.", &by("reason", &s.refused));
    let dirs = [("client_to_tap", t.to_tap_frames), ("tap_to_client", t.to_ws_frames)];
    family("wsnic_frames_total", "counter", "Ethernet frames relayed, by direction.", &by("direction", &dirs));
    let dirs = [("client_to_tap", t.to_tap_bytes), ("tap_to_client", t.to_ws_bytes)];
    family("wsnic_bytes_total", "counter", "Ethernet bytes relayed, by direction.", &by("direction", &dirs));
    let mut drops = vec![
        ("text", t.drop_text),
        ("runt", t.drop_runt),
        ("tap_error", t.drop_tap_error),
        ("oversize", t.drop_oversize),
        ("offload", t.drop_offload),
    ];
    drops.extend(s.policy_drops.iter().copied());
    family("wsnic_frames_dropped_total", "counter", "Frames dropped, by reason.", &by("reason", &drops));
    family("wsnic_frames_answered_total", "counter", "Frames answered in-line (DHCP).", &plain(t.answered));
    if let Some((size, free)) = s.pool {
        family(
            "wsnic_dhcp_messages_total",
            "counter",
            "DHCP messages from clients, by type.",
            &by("type", &s.dhcp_messages),
        );
        family("wsnic_dhcp_pool_addresses", "gauge", "Addresses in the DHCP pool.", &plain(size as u64));
        family("wsnic_dhcp_pool_free", "gauge", "Free addresses in the DHCP pool.", &plain(free as u64));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            uptime_secs: 3725,
            clients: vec![ClientRow {
                peer: "127.0.0.1:5000".into(),
                tap: "wsnic0".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                ip: Some(Ipv4Addr::new(192, 168, 2, 10)),
                connected_secs: 61,
                stats: Stats { to_tap_frames: 3, to_tap_bytes: 300, ..Default::default() },
            }],
            leases: vec![LeaseRow {
                ip: Ipv4Addr::new(192, 168, 2, 10),
                mac: [2, 0, 0, 0, 0, 1],
                hostname: "<script>".into(),
                expires_in: 60,
                connected: true,
            }],
            totals: Stats { to_tap_frames: 3, to_tap_bytes: 300, ..Default::default() },
            refused: vec![("token", 2)],
            pool: Some((253, 252)),
            config: vec![("bridge_name", "wsnicbr0".into())],
            ..Default::default()
        }
    }

    #[test]
    fn html_shows_clients_and_escapes() {
        let h = html(&snap());
        assert!(
            h.contains("wsnic0") && h.contains("02:00:00:00:00:01") && h.contains("192.168.2.10") && h.contains("62m")
        );
        assert!(h.contains("&lt;script&gt;") && !h.contains("<script>"));
        assert!(!h.contains("http://") && !h.contains("https://"), "no external assets");
    }

    #[test]
    fn metrics_are_well_formed() {
        let m = metrics(&snap());
        assert!(m.contains("wsnic_clients 1\n"));
        assert!(m.contains("wsnic_handshakes_refused_total{reason=\"token\"} 2\n"));
        assert!(m.contains("wsnic_frames_total{direction=\"client_to_tap\"} 3\n"));
        assert!(m.contains("wsnic_dhcp_pool_free 252\n"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("wsnic_") && value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
