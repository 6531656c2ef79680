//! The I/O shell of the relay: one single-threaded epoll loop (mio) that owns the listener,
//! every client socket and every TAP, and drives the sans-io cores.

pub mod bufpool;
pub mod event_loop;
pub mod pipe;
pub mod policy;
pub mod reaper;
pub mod shaper;
pub mod transport;

pub use event_loop::{Exit, Relay, Settings};
