//! The `struct virtio_net_hdr` (legacy 10-byte layout, little-endian) that starts every read
//! from and write to a TAP opened with IFF_VNET_HDR, its flag and GSO type values, and the
//! TUNSETOFFLOAD feature bits.

/// `struct virtio_net_hdr`: what the kernel says about the frame behind it (checksum left to
/// complete, segmentation left to do) or what we say about ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (Ethernet to L4). From the kernel only a hint (its linear length).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksum starts, from the start of the Ethernet frame.
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

/// `flags`: the checksum from `csum_start` to the end is to be completed (CHECKSUM_PARTIAL).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksums were verified.
pub const F_DATA_VALID: u8 = 2;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (UFO); not enabled by us, refused if seen.
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation offload (USO), IPv4 or IPv6.
pub const GSO_UDP_L4: u8 = 5;
/// Or'ed into `gso_type`: the TCP segments carry ECN (CWR only on the first).
pub const GSO_ECN: u8 = 0x80;

/// TUNSETOFFLOAD bits.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

/// The header of a frame that needs nothing done: all zeros (for a `writev` in front of a frame).
pub const ZERO: [u8; VnetHdr::LEN] = [0; VnetHdr::LEN];

impl VnetHdr {
    pub const LEN: usize = 10;

    /// The first 10 bytes of `buf`, if there are 10.
    pub fn parse(buf: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VnetHdr::LEN] = buf.get(..VnetHdr::LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Write the header to `out[..10]`. Panics if `out` is shorter.
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..VnetHdr::LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// Asks for segmentation (any GSO type other than none, ECN bit aside).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_little_endian() {
        let h = VnetHdr { flags: 1, gso_type: 4, hdr_len: 0x4a, gso_size: 1448, csum_start: 54, csum_offset: 16 };
        let mut b = [0u8; 10];
        h.write(&mut b);
        assert_eq!(b, [1, 4, 0x4a, 0, 0xa8, 0x05, 54, 0, 16, 0]);
        assert!(h.is_gso() && h.needs_csum());
        assert_eq!(VnetHdr::parse(&ZERO), Some(VnetHdr::default()));
        assert!(!VnetHdr::default().is_gso());
        assert!(!VnetHdr { gso_type: GSO_ECN, ..VnetHdr::default() }.is_gso());
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    proptest! {
        #[test]
        fn round_trip(b: [u8; 10], extra in proptest::collection::vec(any::<u8>(), 0..4)) {
            let mut buf = b.to_vec();
            buf.extend_from_slice(&extra);
            let h = VnetHdr::parse(&buf).unwrap();
            let mut out = [0u8; 10];
            h.write(&mut out);
            prop_assert_eq!(out, b);
        }
    }
}
