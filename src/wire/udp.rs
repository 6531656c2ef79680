//! UDP datagrams (RFC 768) over IPv4: a view and a builder with the pseudo-header checksum.

use std::net::Ipv4Addr;

use super::{checksum, ipv4};

pub const HEADER_LEN: usize = 8;

#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a>(&'a [u8]);

impl<'a> Datagram<'a> {
    pub fn parse(buf: &'a [u8]) -> Option<Datagram<'a>> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
        (len >= HEADER_LEN && len <= buf.len()).then(|| Datagram(&buf[..len]))
    }
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.0[2], self.0[3]])
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.0[HEADER_LEN..]
    }
    /// Checksum over the IPv4 pseudo-header; 0 on the wire means "not computed".
    pub fn checksum_valid(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let wire = u16::from_be_bytes([self.0[6], self.0[7]]);
        wire == 0 || finish(src, dst, self.0) == 0
    }
}

fn finish(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8]) -> u16 {
    let mut sum = checksum::accumulate(0, &src.octets());
    sum = checksum::accumulate(sum, &dst.octets());
    sum += u32::from(ipv4::PROTO_UDP) + datagram.len() as u32;
    checksum::finish(checksum::accumulate(sum, datagram))
}

/// Append an IPv4 header and a UDP datagram carrying `payload` to `out`.
pub fn write_ipv4_udp(out: &mut Vec<u8>, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) {
    let len = HEADER_LEN + payload.len();
    ipv4::write_header(out, src.0, dst.0, ipv4::PROTO_UDP, len);
    let start = out.len();
    out.extend_from_slice(&src.1.to_be_bytes());
    out.extend_from_slice(&dst.1.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let c = match finish(src.0, dst.0, &out[start..]) {
        0 => 0xffff, // 0 would mean "no checksum"
        c => c,
    };
    out[start + 6..start + 8].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet;
    use proptest::prelude::*;

    proptest! {
        /// What the builder writes parses back, with valid checksums, whatever the payload.
        #[test]
        fn build_then_parse(payload in proptest::collection::vec(any::<u8>(), 0..600), a: [u8; 4], b: [u8; 4], sp: u16, dp: u16) {
            let (src, dst) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let mut f = Vec::new();
            ethernet::write_header(&mut f, [0xff; 6], [2, 0, 0, 0, 0, 1], ethernet::ETHERTYPE_IPV4);
            write_ipv4_udp(&mut f, (src, sp), (dst, dp), &payload);
            let eth = ethernet::Frame::parse(&f).unwrap();
            prop_assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV4);
            let ip = ipv4::Packet::parse(eth.payload()).unwrap();
            prop_assert!(ip.header_valid());
            prop_assert_eq!((ip.src(), ip.dst(), ip.protocol()), (src, dst, ipv4::PROTO_UDP));
            let udp = Datagram::parse(ip.payload()).unwrap();
            prop_assert!(udp.checksum_valid(src, dst));
            prop_assert_eq!((udp.src_port(), udp.dst_port()), (sp, dp));
            prop_assert_eq!(udp.payload(), &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some(ip) = ipv4::Packet::parse(&data) {
                let _ = (ip.src(), ip.dst(), ip.header_valid(), ip.is_fragment());
                if let Some(u) = Datagram::parse(ip.payload()) {
                    let _ = (u.payload(), u.checksum_valid(ip.src(), ip.dst()));
                }
            }
        }
    }
}
