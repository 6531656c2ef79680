//! Removes TAP devices away from the event loop's thread.
//!
//! Closing a TAP's file descriptor unregisters its network device, and the kernel waits for
//! an RCU grace period before it returns: about 17 ms per device on a small VM. In the event
//! loop that would stall every other client for each disconnect and cap the connection rate
//! near 60/s. The loop instead hands a finished client's TAP (already out of its poll set) to
//! the reaper thread, which takes every TAP waiting, sets each one down in a device group of
//! its own, deletes the whole group with one `RTM_DELLINK` (one grace period for the batch),
//! and only then closes the descriptors, which is now cheap.
//!
//! The group number is derived from the bridge's ifindex, so two wsnic instances in one
//! namespace never delete each other's devices. Dropping the reaper reaps what is queued and
//! joins the thread, so every TAP is gone before the caller removes the bridge.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::sys::netlink::Netlink;
use crate::sys::tap::Tap;

/// Most TAPs deleted in one batch.
const BATCH: usize = 1024;

pub struct Reaper {
    tx: Option<mpsc::Sender<Tap>>,
    thread: Option<JoinHandle<()>>,
}

/// The device group of the TAPs on their way out, for the bridge with ifindex `bridge`.
pub fn group_for(bridge: u32) -> u32 {
    0x8000_0000 | bridge
}

impl Reaper {
    /// Start the thread; it deletes TAPs through device group `group_for(bridge)`.
    pub fn start(bridge: u32) -> io::Result<Reaper> {
        let mut nl = Netlink::open()?;
        let group = group_for(bridge);
        let (tx, rx) = mpsc::channel::<Tap>();
        let thread = std::thread::Builder::new().name("wsnic-reaper".into()).spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            while let Ok(first) = rx.recv() {
                batch.push(first);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(t) => batch.push(t),
                        Err(_) => break,
                    }
                }
                reap(&mut nl, group, &mut batch);
            }
        })?;
        Ok(Reaper { tx: Some(tx), thread: Some(thread) })
    }

    /// Queue `tap` for removal (never blocks).
    pub fn reap(&self, tap: Tap) {
        if let Some(tx) = &self.tx {
            // The thread only stops when `tx` is dropped; if it died, the TAP closes here.
            let _ = tx.send(tap);
        }
    }
}

fn reap(nl: &mut Netlink, group: u32, batch: &mut Vec<Tap>) {
    let mut grouped = 0;
    for t in batch.iter() {
        match nl.set_down_in_group(t.index(), group) {
            Ok(()) => grouped += 1,
            Err(e) => log::debug!("reaper: {}: {e}", t.name()),
        }
    }
    if grouped > 0 {
        if let Err(e) = nl.delete_group(group) {
            // The descriptors still close below, one grace period each: slower, not wrong.
            log::warn!("reaper: deleting {grouped} TAP devices at once failed: {e}");
        }
    }
    batch.clear();
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
