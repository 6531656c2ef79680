//! Ethernet II frames (IEEE 802.3 without FCS, as v86 sends them).

use super::Mac;

pub const HEADER_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// A view of a frame of at least 14 bytes.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a>(&'a [u8]);

impl<'a> Frame<'a> {
    pub fn parse(buf: &'a [u8]) -> Option<Frame<'a>> {
        (buf.len() >= HEADER_LEN).then_some(Frame(buf))
    }
    pub fn dst(&self) -> Mac {
        self.0[0..6].try_into().expect("6 bytes")
    }
    pub fn src(&self) -> Mac {
        self.0[6..12].try_into().expect("6 bytes")
    }
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.0[12], self.0[13]])
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.0[HEADER_LEN..]
    }
}

/// Append an Ethernet header to `out`.
pub fn write_header(out: &mut Vec<u8>, dst: Mac, src: Mac, ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// Multicast (including broadcast) addresses have the group bit set.
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}
