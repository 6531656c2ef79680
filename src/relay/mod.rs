//! The I/O shell of the relay: single-threaded epoll loops (mio), one per worker, each owning
//! its listening sockets, its clients' sockets and TAPs, and driving the sans-io cores; what
//! the workers share is in `shared`, how they are started and stopped in `workers`.

pub mod bufpool;
pub mod event_loop;
pub mod linger;
pub mod pipe;
pub mod policy;
pub mod reaper;
pub mod shaper;
pub mod shared;
pub mod transport;
pub mod workers;

pub use event_loop::{Relay, Settings};
