//! DHCPv4 server for the bridge's clients, sans-io: the message codec ([`wire`]), the lease
//! state machine ([`server`]) and the lease file ([`store`]). The relay feeds it the DHCP
//! messages its clients send and the connection closes, and sends back what it answers.

pub mod server;
pub mod store;
pub mod wire;

pub use server::{ConnId, Lease, Reply, Server, ServerConfig};
pub use wire::{decode, encode, DecodeError, Message, MessageType};
