//! Wire formats the relay looks into or builds: Ethernet II, IPv4, UDP, and the Internet
//! checksum. Zero-copy views over byte slices (`Frame::parse` → accessors) and builders that
//! write into a caller's buffer; one file per protocol.

pub mod checksum;
pub mod ethernet;
pub mod ipv4;
pub mod udp;

/// A MAC address.
pub type Mac = [u8; 6];

pub const BROADCAST_MAC: Mac = [0xff; 6];
