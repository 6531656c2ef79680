//! `wsnic`: command line, configuration loading and the relay's start and orderly exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use wsnic::config::{Config, ConfigError, KEYS};
use wsnic::netsetup::Network;
use wsnic::relay::workers::{self, DhcpSetup, Listeners, Workers};
use wsnic::relay::Settings;

fn cli() -> Command {
    let mut cmd = Command::new("wsnic")
        .version(env!("CARGO_PKG_VERSION"))
        .about("WebSocket to TAP device relay: gives browser-based emulators (v86, jor1k, JSLinux) a real, NAT-ed virtual network")
        .after_help("Every configuration key can be given as --key-name VALUE (or --key_name); command line beats file beats built-in default.\nNeeds root or CAP_NET_ADMIN.")
        .arg(Arg::new("config").short('c').long("config").value_name("FILE").help("configuration file (default: wsnic.conf in the working directory, if it exists)"))
        .arg(
            Arg::new("verbose")
                .short('v')
                .long("verbose")
                .global(true)
                .action(ArgAction::SetTrue)
                .conflicts_with("quiet")
                .help("print debug output"),
        )
        .arg(Arg::new("quiet").short('q').long("quiet").global(true).action(ArgAction::SetTrue).help("print only warnings and errors"))
        .args_conflicts_with_subcommands(true)
        .subcommand(
            Command::new("connect")
                .about("Put this machine on a relay's LAN: a local TAP device carried over one WebSocket, as a browser VM does")
                .arg(Arg::new("url").required(true).value_name("URL").help("the relay, ws://HOST[:PORT][/PATH] or wss://HOST[:PORT][/PATH]"))
                .arg(Arg::new("tap").long("tap").value_name("NAME").default_value("wstap%d").help("TAP device name; %d lets the kernel pick a number"))
                .arg(Arg::new("mac").long("mac").value_name("MAC").help("MAC address of the TAP (default: a stable locally administered one, derived from this machine and the TAP's name)"))
                .arg(Arg::new("offload").long("offload").action(ArgAction::SetTrue).help("TAP offload: take TCP/UDP super-frames from the kernel and cut them into real frames; merge the relay's TCP segments into super-frames"))
                .arg(Arg::new("ca").long("ca").value_name("FILE").help("wss://: trust this CA bundle (PEM) instead of the system's roots"))
                .arg(Arg::new("max-frame-size").long("max-frame-size").value_name("BYTES").default_value("65549").help("largest frame accepted from the relay, 1514..65549")),
        );
    for k in KEYS {
        let long = k.name.replace('_', "-");
        let help =
            if k.default.is_empty() { k.help.to_string() } else { format!("{} [default: {}]", k.help, k.default) };
        cmd = cmd.arg(
            Arg::new(k.name).long(long).alias(k.name).value_name("VALUE").help(help).help_heading("Configuration keys"),
        );
    }
    cmd
}

fn load_config(m: &clap::ArgMatches) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let file = match m.get_one::<String>("config") {
        Some(f) => Some(PathBuf::from(f)),
        None => Some(PathBuf::from("wsnic.conf")).filter(|p| p.exists()),
    };
    if let Some(f) = &file {
        cfg.apply_file(f)?;
    }
    for k in KEYS {
        if let Some(v) = m.get_one::<String>(k.name) {
            cfg.set_from(k.name, v, format!("--{}", k.name.replace('_', "-")))?;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let m = cli().get_matches();
    let verbosity = if m.get_flag("verbose") {
        1
    } else if m.get_flag("quiet") {
        -1
    } else {
        0
    };
    wsnic::logging::init(verbosity);
    if let Some(c) = m.subcommand_matches("connect") {
        return connect(c);
    }
    let cfg = match load_config(&m) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsnic: {e}");
            return ExitCode::from(2);
        }
    };
    if !wsnic::sys::has_net_admin() {
        eprintln!("wsnic: needs root or CAP_NET_ADMIN to create its bridge and TAP devices (run it with sudo)");
        return ExitCode::from(1);
    }
    if let Some(name) = &cfg.tcp_congestion {
        if let Err(e) = wsnic::sys::check_tcp_congestion(name) {
            eprintln!("wsnic: {}", cfg.error_at("tcp_congestion", e));
            return ExitCode::from(2);
        }
    }
    match serve(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn connect(m: &clap::ArgMatches) -> ExitCode {
    let arg = |k: &str| m.get_one::<String>(k).cloned();
    let usage = |e: String| {
        eprintln!("wsnic connect: {e}");
        ExitCode::from(2)
    };
    let mac = match arg("mac").map(|s| wsnic::sys::parse_mac(&s)).transpose() {
        Ok(m) => m,
        Err(e) => return usage(format!("--mac: {e}")),
    };
    let max_frame = match arg("max-frame-size").unwrap_or_default().parse::<usize>() {
        Ok(n) if (1514..=65549).contains(&n) => n,
        _ => return usage("--max-frame-size: expected a number of bytes in 1514..65549".into()),
    };
    let url = arg("url").unwrap_or_default();
    if let Err(e) = wsnic::connect::parse_url(&url) {
        return usage(e);
    }
    if !wsnic::sys::has_net_admin() {
        eprintln!("wsnic connect: needs root or CAP_NET_ADMIN to create a TAP device (run it with sudo)");
        return ExitCode::from(1);
    }
    let opts = wsnic::connect::Options {
        url,
        tap: arg("tap").unwrap_or_default(),
        mac,
        max_frame,
        offload: m.get_flag("offload"),
        ping_interval: std::time::Duration::from_secs(30),
        idle_timeout: std::time::Duration::from_secs(100),
        ca: arg("ca").map(PathBuf::from),
    };
    match wsnic::connect::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsnic connect: {e}");
            ExitCode::from(1)
        }
    }
}

/// The DHCP engine for `cfg`, with the lease file's leases (read before the network is touched,
/// so a corrupt file stops us without changing anything).
fn dhcp_server(cfg: &Config) -> Result<Option<wsnic::dhcp::server::Server>, String> {
    use wsnic::dhcp::{server, store};
    if cfg.disable_dhcp {
        return Ok(None);
    }
    let mut s = server::Server::new(server::ServerConfig {
        server_ip: cfg.bridge_addr(),
        subnet: cfg.bridge_subnet,
        router: cfg.dhcp_gateway.unwrap_or(cfg.bridge_addr()),
        dns: cfg.dhcp_domain_name_server.clone(),
        domain_name: cfg.dhcp_domain_name.clone(),
        mtu: cfg.dhcp_mtu,
        lease_time: cfg.dhcp_lease_time,
        range: cfg.dhcp_range,
        reservations: cfg.dhcp_host.clone(),
        grace: cfg.dhcp_lease_grace.as_secs() as u32,
        quarantine: 600,
        offer_timeout: 60,
    })
    .map_err(|e| format!("DHCP: {e}"))?;
    if let Some(path) = &cfg.dhcp_lease_file {
        use wsnic::relay::policy::{from_wall, unix_now, wall_now};
        let (engine, wall) = (unix_now(), wall_now());
        let leases: Vec<_> = store::load(path)?
            .into_iter()
            .map(|l| wsnic::dhcp::Lease { expires: from_wall(l.expires, engine, wall), ..l })
            .collect();
        log::info!("loaded {} DHCP leases from {}", leases.len(), path.display());
        s.load(leases, engine);
    }
    Ok(Some(s))
}

fn serve(cfg: &Config) -> Result<(), String> {
    // Signals are caught from here on, so an early SIGTERM still leads to a clean teardown.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
    let dhcp = dhcp_server(cfg)?;
    if let Err(e) = wsnic::sys::raise_nofile_limit() {
        log::warn!("cannot raise the open-files limit: {e}");
    }
    let n = cfg.worker_count();
    let bind = |port: u16| -> Result<Vec<Option<std::net::TcpListener>>, String> {
        if port == 0 {
            return Ok((0..n).map(|_| None).collect());
        }
        let addr = std::net::SocketAddr::new(cfg.ws_server_addr, port);
        let ls = workers::bind(addr, n, cfg.tcp_congestion.as_deref())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        Ok(ls.into_iter().map(Some).collect())
    };
    let ws = bind(cfg.ws_server_port)?;
    let wss = bind(cfg.wss_port)?;
    let tls = match (&cfg.wss_certificate, &cfg.wss_private_key) {
        (Some(cert), Some(key)) if cfg.wss_port != 0 => Some(wsnic::tls::server_config(cert, key)?),
        _ => None,
    };
    let listeners: Vec<Listeners> =
        ws.into_iter().zip(wss).map(|(ws, wss)| Listeners { ws, wss: wss.zip(tls.clone()) }).collect();
    // The main thread waits for signals, and for a worker that stops on its own.
    const SIGNALS: mio::Token = mio::Token(0);
    const WORKER_STOPPED: mio::Token = mio::Token(1);
    let mut poll = mio::Poll::new().map_err(|e| format!("poll: {e}"))?;
    poll.registry().register(&mut signals, SIGNALS, mio::Interest::READABLE).map_err(|e| format!("signals: {e}"))?;
    let waker = mio::Waker::new(poll.registry(), WORKER_STOPPED).map_err(|e| format!("poll: {e}"))?;
    let settings = settings_of(cfg);
    let net = Network::up(cfg)?;
    let settings = Settings { summary: cfg.summary(net.uplink.as_deref()), ..settings };
    let dhcp = dhcp.map(|server| DhcpSetup {
        server,
        server_ip: cfg.bridge_addr(),
        server_mac: net.bridge_mac,
        lease_file: cfg.dhcp_lease_file.clone(),
    });
    let workers = match Workers::start(listeners, settings, cfg.anti_spoofing, dhcp, net.bridge_index, waker) {
        Ok(w) => w,
        Err(e) => {
            net.down();
            return Err(format!("event loop: {e}"));
        }
    };
    log::info!(
        "wsnic {} listening on {}{} — bridge {} {}/{}, uplink {}, NAT {}, DHCP {}",
        env!("CARGO_PKG_VERSION"),
        [("ws", cfg.ws_server_port), ("wss", cfg.wss_port)]
            .iter()
            .filter(|(_, p)| *p != 0)
            .map(|(s, p)| format!("{s}://{}/", std::net::SocketAddr::new(cfg.ws_server_addr, *p)))
            .collect::<Vec<_>>()
            .join(" and "),
        if n > 1 { format!(" with {n} workers") } else { String::new() },
        cfg.bridge_name,
        cfg.bridge_addr(),
        cfg.bridge_subnet.prefix,
        net.uplink.as_deref().unwrap_or("none"),
        if cfg.nat && net.uplink.is_some() { "on" } else { "off" },
        if cfg.disable_dhcp { "off (passed to the bridge)" } else { "on" },
    );
    let mut events = mio::Events::with_capacity(8);
    let result = 'run: loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Err(format!("poll: {e}"));
        }
        for ev in events.iter() {
            match ev.token() {
                SIGNALS => {
                    let pending: Vec<i32> = signals.pending().collect();
                    if let Some(sig) = pending.iter().find(|s| **s != SIGHUP) {
                        log::info!("signal {sig}: shutting down");
                        break 'run Ok(());
                    }
                    if !pending.is_empty() {
                        reload(&workers, cfg, net.uplink.as_deref());
                    }
                }
                // Only a worker that stopped on its own wakes this: its thread may still be
                // finishing (dropping its TAPs), so do not wait for it to be seen as finished.
                _ => break 'run Err("an event loop stopped".to_string()),
            }
        }
    };
    let stopped = workers.stop(); // closes every TAP before the bridge goes
    net.down();
    log::info!("network state restored; bye");
    result.and(stopped)
}

/// The event loop's settings for `cfg`.
fn settings_of(cfg: &Config) -> Settings {
    Settings {
        tap_pattern: format!("{}%d", cfg.tap_prefix),
        max_frame: cfg.max_frame_size,
        tap_offload: cfg.tap_offload,
        tap_threads: cfg.tap_threads,
        ping_interval: cfg.ping_interval,
        idle_timeout: cfg.idle_timeout,
        handshake_timeout: cfg.handshake_timeout,
        admission: wsnic::admission::Admission {
            max_clients: cfg.max_clients,
            max_per_ip: cfg.max_clients_per_ip,
            trusted_proxies: cfg.trusted_proxies.clone(),
            allowed_origins: cfg.allowed_origins.clone(),
            token: cfg.auth_token.clone(),
        },
        isolation: cfg.client_isolation,
        rate_limit: cfg.rate_limit,
        status_allow: cfg.status_allow.clone(),
        summary: Vec::new(),
    }
}

/// SIGHUP: read the configuration again (file and command line, as at start). What can change
/// while running takes effect for new connections; what cannot is named in the log. A bad
/// file keeps the running configuration.
fn reload(workers: &Workers, running: &Config, uplink: Option<&str>) {
    let m = cli().get_matches();
    let new = match load_config(&m) {
        Ok(c) => c,
        Err(e) => {
            log::error!("reload: {e}; keeping the running configuration");
            return;
        }
    };
    let restart: Vec<&str> =
        wsnic::config::RESTART_KEYS.iter().copied().filter(|k| running.value_of(k) != new.value_of(k)).collect();
    if !restart.is_empty() {
        log::warn!("reload: {} changed but take effect only after a restart", restart.join(", "));
    }
    let settings = Settings { summary: new.summary_after_reload(running, uplink), ..settings_of(&new) };
    let mut tls = None;
    if let (Some(cert), Some(key)) = (&new.wss_certificate, &new.wss_private_key) {
        match wsnic::tls::server_config(cert, key) {
            Ok(t) => {
                tls = Some(t);
                log::info!("reload: TLS certificate {} loaded for new wss:// connections", cert.display());
            }
            Err(e) => log::error!("reload: {e}; keeping the current certificate"),
        }
    }
    workers.reload(&settings, new.anti_spoofing, tls);
    log::info!(
        "reload: configuration read again; limits, authentication, rate limit and timeouts apply to new connections"
    );
}
