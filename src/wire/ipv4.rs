//! IPv4 packets (RFC 791): a validating view and a header builder.

use std::net::Ipv4Addr;

use super::checksum;

pub const PROTO_UDP: u8 = 17;
pub const MIN_HEADER: usize = 20;

/// A view of an IPv4 packet whose header is well-formed and whose total length fits.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    buf: &'a [u8],
    header_len: usize,
    total_len: usize,
}

impl<'a> Packet<'a> {
    pub fn parse(buf: &'a [u8]) -> Option<Packet<'a>> {
        if buf.len() < MIN_HEADER || buf[0] >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(buf[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        (header_len >= MIN_HEADER && total_len >= header_len && total_len <= buf.len()).then_some(Packet {
            buf,
            header_len,
            total_len,
        })
    }
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.buf[12], self.buf[13], self.buf[14], self.buf[15])
    }
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.buf[16], self.buf[17], self.buf[18], self.buf[19])
    }
    pub fn protocol(&self) -> u8 {
        self.buf[9]
    }
    /// A fragment (other than a whole datagram) carries MF or an offset.
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes([self.buf[6], self.buf[7]]) & 0x3fff != 0
    }
    pub fn header_valid(&self) -> bool {
        checksum::checksum(&self.buf[..self.header_len]) == 0
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.header_len..self.total_len]
    }
}

/// Append a 20-byte header (no options, DF clear, TTL 64) for `payload_len` bytes.
pub fn write_header(out: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) {
    let start = out.len();
    let total = (MIN_HEADER + payload_len) as u16;
    out.extend_from_slice(&[0x45, 0x10, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0]);
    out[start + 2..start + 4].copy_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum::checksum(&out[start..start + MIN_HEADER]);
    out[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}
