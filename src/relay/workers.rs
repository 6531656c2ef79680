//! The worker threads: `workers = N` event loops, each started with its own Poll, listening
//! sockets (SO_REUSEPORT when N > 1), netlink socket and [`Policy`], all sharing one
//! [`Shared`]; commanded through their mailboxes (reload, shutdown) and joined on exit. The
//! main thread keeps the signals and the network setup and only waits: on its own Poll, for
//! a signal or for a worker that stopped on its own.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Poll, Waker};

use super::event_loop::{Relay, Settings, WAKER};
use super::policy::{Dhcp, Policy};
use super::shared::{Command, Shared};
use crate::dhcp::server::Server;
use crate::sys::netlink::Netlink;
use crate::wire::Mac;

/// How often the lease writer looks for changed leases: the most a crash can lose.
const LEASE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// One worker's listening sockets.
pub struct Listeners {
    /// ws://
    pub ws: Option<TcpListener>,
    /// wss://, with the TLS configuration.
    pub wss: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
}

/// `n` listening sockets on `addr`, one per worker. Several share the address with
/// SO_REUSEPORT, after a check that nothing listens there yet: the kernel would let another
/// process of the same user join the group and take a share of the connections.
/// `congestion`: the TCP congestion control their connections inherit.
pub fn bind(addr: SocketAddr, n: usize, congestion: Option<&str>) -> io::Result<Vec<TcpListener>> {
    if n == 1 {
        return Ok(vec![Relay::bind(addr, false, congestion)?]);
    }
    drop(Relay::bind(addr, false, None)?); // EADDRINUSE if anyone listens there
    (0..n).map(|_| Relay::bind(addr, true, congestion)).collect()
}

/// The built-in DHCP server: the engine (shared), the server's address and MAC (replies
/// come from them), the lease file.
pub struct DhcpSetup {
    pub server: Server,
    pub server_ip: Ipv4Addr,
    pub server_mac: Mac,
    pub lease_file: Option<PathBuf>,
}

/// The running workers.
pub struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    /// The lease writer (with a lease file): dropping the sender stops it after a last write.
    leases: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// The lease writer: rewrites the lease file (temp file, fsync, rename, fsync) at most once
/// per [`LEASE_WRITE_INTERVAL`] when the leases changed, so that no event loop ever waits for
/// the disk however often clients renew; once more when told to stop.
fn start_lease_writer(shared: &Arc<Shared>) -> io::Result<Option<(mpsc::Sender<()>, JoinHandle<()>)>> {
    if !shared.keeps_leases() {
        return Ok(None);
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let shared = shared.clone();
    let t = std::thread::Builder::new().name("leases".into()).spawn(move || loop {
        let last = !matches!(stopped.recv_timeout(LEASE_WRITE_INTERVAL), Err(mpsc::RecvTimeoutError::Timeout));
        shared.save_leases();
        if last {
            return;
        }
    })?;
    Ok(Some((stop, t)))
}

/// Wakes the main thread when a worker's thread ends, however it ends (error or panic).
struct WakeMainOnExit(Arc<Shared>);

impl Drop for WakeMainOnExit {
    fn drop(&mut self) {
        self.0.wake_main();
    }
}

impl Workers {
    /// Start one worker per entry of `listeners`; each attaches its TAPs to `bridge_index`.
    /// `main` is woken if a worker stops on its own.
    pub fn start(
        listeners: Vec<Listeners>,
        settings: Settings,
        anti_spoofing: bool,
        dhcp: Option<DhcpSetup>,
        bridge_index: u32,
        main: Waker,
    ) -> io::Result<Workers> {
        let n = listeners.len();
        let polls = (0..n).map(|_| Poll::new()).collect::<io::Result<Vec<_>>>()?;
        let wakers = polls.iter().map(|p| Waker::new(p.registry(), WAKER)).collect::<io::Result<Vec<_>>>()?;
        let (server, addr, lease_file) = match dhcp {
            Some(d) => (Some(d.server), Some((d.server_ip, d.server_mac)), d.lease_file),
            None => (None, None, None),
        };
        let shared = Arc::new(Shared::new(server, lease_file, wakers, main));
        let leases = start_lease_writer(&shared)?;
        // Every event loop is built before any thread starts, so a failure leaves none running.
        let mut relays = Vec::with_capacity(n);
        for (i, (poll, l)) in polls.into_iter().zip(listeners).enumerate() {
            let policy = Policy::new(shared.clone(), i, addr.map(|(ip, mac)| Dhcp::new(ip, mac)), anti_spoofing);
            relays.push(Relay::new(i, poll, l.ws, l.wss, settings.clone(), policy, shared.clone())?);
        }
        let mut threads = Vec::with_capacity(n);
        for (i, relay) in relays.into_iter().enumerate() {
            let exit = WakeMainOnExit(shared.clone());
            let t = std::thread::Builder::new().name(format!("w{i}")).spawn(move || {
                let _exit = exit;
                // Declared after `_exit`, so dropped (TAPs reaped) before it wakes the main thread.
                let mut relay = relay;
                if n > 1 {
                    crate::logging::set_thread_tag(format!("[w{i}] "));
                }
                let r = Netlink::open().and_then(|mut nl| relay.run(bridge_index, &mut nl));
                if let Err(e) = &r {
                    log::error!("event loop stopped: {e}");
                }
                r
            });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let w = Workers { shared, threads, leases };
                    let _ = w.stop();
                    return Err(e);
                }
            }
        }
        Ok(Workers { shared, threads, leases })
    }

    /// New settings for every worker; returns once all have them in force.
    pub fn reload(&self, settings: &Settings, anti_spoofing: bool, tls: Option<Arc<rustls::ServerConfig>>) {
        let (done, confirmed) = mpsc::channel();
        for w in 0..self.threads.len() {
            let settings = Box::new(settings.clone());
            self.shared.send(w, Command::Reload { settings, anti_spoofing, tls: tls.clone(), done: done.clone() });
        }
        for _ in 0..self.threads.len() {
            // A worker answers within one pass; only a stopped one never does.
            if confirmed.recv_timeout(Duration::from_secs(10)).is_err() {
                log::warn!("reload: a worker did not confirm the new configuration");
                break;
            }
        }
    }

    /// Close every client (1001) and drop every TAP, on every worker; wait for all; then write
    /// the leases a last time (every client's now in its grace period).
    pub fn stop(self) -> Result<(), String> {
        for w in 0..self.threads.len() {
            self.shared.send(w, Command::Shutdown);
        }
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(format!("event loop: {e}")),
                Err(_) => result = Err("an event loop panicked".to_string()),
            }
        }
        if let Some((stop, t)) = self.leases {
            drop(stop);
            if t.join().is_err() {
                result = Err("the lease writer panicked".to_string());
            }
        }
        result
    }
}
