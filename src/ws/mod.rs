//! RFC 6455 WebSocket protocol, sans-io: handshake, frame codec and per-connection message
//! state. Nothing here touches a socket; the relay, `wsnic connect` and the echo example
//! drive it with their own I/O.

pub mod conn;
pub mod frame;
pub mod handshake;

pub use conn::{Conn, Item, Parsed, Payload};
pub use frame::{close_code, Opcode, Role, Violation};
