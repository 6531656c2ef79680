//! wsnic: a WebSocket to TAP relay for browser-based emulators.

pub mod admission;
pub mod config;
pub mod connect;
pub mod dhcp;
pub mod logging;
pub mod netsetup;
pub mod offload;
pub mod relay;
pub mod status;
pub mod sys;
pub mod tls;
pub mod wire;
pub mod ws;
