//! Header geometry shared by both offload directions: where a frame's IP header, L4 header and
//! packet end are (Ethernet II + IPv4 or IPv6 without extension headers), the TCP flag bits,
//! and the L4 pseudo-header sum.

use super::segment::Error;
use crate::wire::checksum;

pub use crate::wire::ethernet::{ETHERTYPE_IPV4, HEADER_LEN as ETH_LEN};
pub use crate::wire::ipv4::{MIN_HEADER as IPV4_MIN, PROTO_UDP};
pub use crate::wire::udp::HEADER_LEN as UDP_LEN;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const IPV6_LEN: usize = 40;
pub const TCP_MIN: usize = 20;
pub const PROTO_TCP: u8 = 6;
/// Largest IP packet (header included) an IPv4 length field can describe; we keep IPv6 to it too.
pub const MAX_IP_LEN: usize = 65535;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_CWR: u8 = 0x80;
/// Offsets inside the TCP header.
pub const TCP_SEQ: usize = 4;
pub const TCP_FLAGS: usize = 13;
pub const TCP_WINDOW: usize = 14;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

/// The IP layer of a frame whose IP header lies wholly inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip {
    pub v6: bool,
    /// Offset of the L4 header in the frame.
    pub l4: usize,
    /// IPv4 protocol or IPv6 next header.
    pub proto: u8,
    /// Offset just past the packet, as its IP length says (at most the frame's length).
    pub end: usize,
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Parse the Ethernet and IP headers: IPv4 (options allowed; not a fragment) or IPv6 (the next
/// header is reported as is, so an extension header shows up as a protocol other than TCP/UDP).
/// The IP length must fit in the frame; bytes after it are the caller's to judge.
pub fn ip(frame: &[u8]) -> Result<Ip, Error> {
    if frame.len() < ETH_LEN {
        return Err(Error::Truncated);
    }
    match be16(frame, 12) {
        ETHERTYPE_IPV4 => {
            if frame.len() < ETH_LEN + IPV4_MIN {
                return Err(Error::Truncated);
            }
            let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
            let total = usize::from(be16(frame, ETH_LEN + 2));
            if frame[ETH_LEN] >> 4 != 4 || ihl < IPV4_MIN || total < ihl {
                return Err(Error::BadHeader);
            }
            if ETH_LEN + total > frame.len() {
                return Err(Error::Truncated);
            }
            if be16(frame, ETH_LEN + 6) & 0x3fff != 0 {
                return Err(Error::Fragment);
            }
            Ok(Ip { v6: false, l4: ETH_LEN + ihl, proto: frame[ETH_LEN + 9], end: ETH_LEN + total })
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < ETH_LEN + IPV6_LEN {
                return Err(Error::Truncated);
            }
            if frame[ETH_LEN] >> 4 != 6 {
                return Err(Error::BadHeader);
            }
            let payload = usize::from(be16(frame, ETH_LEN + 4));
            if payload == 0 {
                return Err(Error::BadLength); // a jumbogram (or nothing at all)
            }
            let end = ETH_LEN + IPV6_LEN + payload;
            if end > frame.len() {
                return Err(Error::Truncated);
            }
            Ok(Ip { v6: true, l4: ETH_LEN + IPV6_LEN, proto: frame[ETH_LEN + 6], end })
        }
        _ => Err(Error::NotIp),
    }
}

/// The pseudo-header sum (RFC 793 / RFC 8200 §8.1) of an L4 datagram of `l4_len` bytes in
/// `frame`, whose IP header (IPv4 at 14, or IPv6) holds the addresses. Not folded, not complemented.
pub fn pseudo(frame: &[u8], v6: bool, proto: u8, l4_len: usize) -> u32 {
    let addrs = if v6 { &frame[ETH_LEN + 8..ETH_LEN + 40] } else { &frame[ETH_LEN + 12..ETH_LEN + 20] };
    let len = l4_len as u32;
    checksum::accumulate(0, addrs) + u32::from(proto) + (len >> 16) + (len & 0xffff)
}

/// The IPv4 header checksum of `frame`'s header (at 14, `ihl` bytes), written in place.
pub fn set_ipv4_checksum(frame: &mut [u8], l4: usize) {
    put16(frame, ETH_LEN + 10, 0);
    let c = checksum::checksum(&frame[ETH_LEN..l4]);
    put16(frame, ETH_LEN + 10, c);
}
