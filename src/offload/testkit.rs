//! Test support shared by the offload tests: a reference Internet checksum written
//! independently of `wire::checksum`, builders of Ethernet frames carrying TCP or UDP over IPv4
//! or IPv6, and a reader that checks every length and checksum of a frame with the reference.

use super::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use proptest::prelude::*;

/// One's-complement sum of big-endian 16-bit words, the slow obvious way (not folded).
pub fn ref_sum(data: &[u8]) -> u64 {
    data.chunks(2).map(|c| u64::from(c[0]) << 8 | u64::from(*c.get(1).unwrap_or(&0))).sum()
}

/// Fold to 16 bits, end-around carry, not complemented.
pub fn ref_fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

#[derive(Debug, Clone)]
pub struct Flow {
    pub v6: bool,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// IPv4 uses the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tos: u8,
    pub ttl: u8,
    pub df: bool,
    pub flow_label: u32,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_opts: Vec<u8>,
    /// TCP options (a multiple of 4 bytes, at most 40).
    pub tcp_opts: Vec<u8>,
    pub ack: u32,
    pub window: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp { seq: u32, flags: u8 },
    Udp,
}

/// How the L4 checksum field is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Csum {
    /// The real checksum (TCP: as folded, 0 allowed; UDP: 0 sent as 0xffff).
    Full,
    /// The folded pseudo-header sum, not complemented (CHECKSUM_PARTIAL).
    Partial,
}

impl Flow {
    fn addr_len(&self) -> usize {
        if self.v6 {
            16
        } else {
            4
        }
    }

    pub fn ip_hdr_len(&self) -> usize {
        if self.v6 {
            40
        } else {
            20 + self.ip_opts.len()
        }
    }

    pub fn l4_hdr_len(&self, l4: L4) -> usize {
        match l4 {
            L4::Tcp { .. } => 20 + self.tcp_opts.len(),
            L4::Udp => 8,
        }
    }

    /// Ethernet + IP + L4 header length.
    pub fn hdr_len(&self, l4: L4) -> usize {
        14 + self.ip_hdr_len() + self.l4_hdr_len(l4)
    }

    pub fn pseudo_sum(&self, proto: u8, l4_len: usize) -> u64 {
        let n = self.addr_len();
        ref_sum(&self.src[..n]) + ref_sum(&self.dst[..n]) + u64::from(proto) + l4_len as u64
    }

    /// An Ethernet frame of this flow with a correct IPv4 header checksum and the L4 checksum
    /// filled as `csum` says.
    pub fn frame(&self, l4: L4, id: u16, payload: &[u8], csum: Csum) -> Vec<u8> {
        let proto = if let L4::Tcp { .. } = l4 { TCP } else { UDP };
        let l4_len = self.l4_hdr_len(l4) + payload.len();
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(if self.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        let n = self.addr_len();
        if self.v6 {
            let w = 6 << 28 | u32::from(self.tos) << 20 | (self.flow_label & 0xfffff);
            f.extend_from_slice(&w.to_be_bytes());
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[proto, self.ttl]);
        } else {
            let ihl = (20 + self.ip_opts.len()) / 4;
            f.extend_from_slice(&[0x40 | ihl as u8, self.tos]);
            f.extend_from_slice(&((self.ip_hdr_len() + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(if self.df { &[0x40, 0] } else { &[0, 0] });
            f.extend_from_slice(&[self.ttl, proto, 0, 0]);
        }
        f.extend_from_slice(&self.src[..n]);
        f.extend_from_slice(&self.dst[..n]);
        if !self.v6 {
            f.extend_from_slice(&self.ip_opts);
            let c = !ref_fold(ref_sum(&f[14..]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let l4_start = f.len();
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        let field = match l4 {
            L4::Tcp { seq, flags } => {
                f.extend_from_slice(&seq.to_be_bytes());
                f.extend_from_slice(&self.ack.to_be_bytes());
                f.extend_from_slice(&[(((20 + self.tcp_opts.len()) / 4) << 4) as u8, flags]);
                f.extend_from_slice(&self.window.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 0]);
                f.extend_from_slice(&self.tcp_opts);
                l4_start + 16
            }
            L4::Udp => {
                f.extend_from_slice(&(l4_len as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
                l4_start + 6
            }
        };
        f.extend_from_slice(payload);
        let pseudo = self.pseudo_sum(proto, l4_len);
        let c = match csum {
            Csum::Partial => ref_fold(pseudo),
            Csum::Full => match !ref_fold(pseudo + ref_sum(&f[l4_start..])) {
                0 if proto == UDP => 0xffff,
                c => c,
            },
        };
        f[field..field + 2].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// The vnet header the kernel would put in front of a super-frame of this flow.
    pub fn gso_hdr(&self, l4: L4, gso_size: u16, ecn: bool) -> VnetHdr {
        let gso_type = match l4 {
            L4::Tcp { .. } if self.v6 => GSO_TCPV6,
            L4::Tcp { .. } => GSO_TCPV4,
            L4::Udp => GSO_UDP_L4,
        };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: gso_type | if ecn { GSO_ECN } else { 0 },
            hdr_len: self.hdr_len(l4) as u16,
            gso_size,
            csum_start: (14 + self.ip_hdr_len()) as u16,
            csum_offset: if l4 == L4::Udp { 6 } else { 16 },
        }
    }
}

/// What `read` found in a frame whose lengths and checksums all check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub v6: bool,
    pub proto: u8,
    /// IPv4 identification (0 for IPv6).
    pub id: u16,
    /// TCP only.
    pub seq: u32,
    pub flags: u8,
    pub window: u16,
    pub l4: usize,
    /// Offset of the payload.
    pub payload_at: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Check a frame as a receiver would, with the reference checksum: IP length matches the frame,
/// IPv4 header checksum, UDP length, L4 checksum (UDP: not 0). Panics (failing the test) otherwise.
pub fn read(f: &[u8]) -> Seen {
    let v6 = be16(f, 12) == 0x86dd;
    let (l4, proto, id, addrs) = if v6 {
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(usize::from(be16(f, 18)) + 54, f.len(), "IPv6 payload length");
        (54, f[20], 0, &f[22..54])
    } else {
        assert_eq!(be16(f, 12), 0x0800);
        let ihl = usize::from(f[14] & 15) * 4;
        assert_eq!(usize::from(be16(f, 16)) + 14, f.len(), "IPv4 total length");
        assert_eq!(ref_fold(ref_sum(&f[14..14 + ihl])), 0xffff, "IPv4 header checksum");
        (14 + ihl, f[23], be16(f, 18), &f[26..34])
    };
    let l4_len = f.len() - l4;
    let sum = ref_sum(addrs) + u64::from(proto) + l4_len as u64 + ref_sum(&f[l4..]);
    assert_eq!(ref_fold(sum), 0xffff, "L4 checksum");
    if proto == UDP {
        assert_eq!(usize::from(be16(f, l4 + 4)), l4_len, "UDP length");
        assert_ne!(be16(f, l4 + 6), 0, "UDP checksum present");
        Seen { v6, proto, id, seq: 0, flags: 0, window: 0, l4, payload_at: l4 + 8 }
    } else {
        assert_eq!(proto, TCP);
        let seq = u32::from_be_bytes(f[l4 + 4..l4 + 8].try_into().unwrap());
        let payload_at = l4 + usize::from(f[l4 + 12] >> 4) * 4;
        Seen { v6, proto, id, seq, flags: f[l4 + 13], window: be16(f, l4 + 14), l4, payload_at }
    }
}

/// A random flow: addresses, ports, MACs, TOS, TTL, DF, flow label, IPv4 and TCP options.
pub fn flow(v6: bool) -> impl Strategy<Value = Flow> {
    (
        (any::<[u8; 6]>(), any::<[u8; 6]>(), any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()),
        (any::<u8>(), any::<u8>(), any::<bool>(), any::<u32>()),
        (0usize..=10, 0usize..=10).prop_flat_map(|(a, b)| {
            (proptest::collection::vec(any::<u8>(), a * 4), proptest::collection::vec(any::<u8>(), b * 4))
        }),
        (any::<u32>(), any::<u16>()),
    )
        .prop_map(
            move |((dst_mac, src_mac, src, dst, sport, dport), (tos, ttl, df, fl), (ipo, tcpo), (ack, window))| Flow {
                v6,
                dst_mac,
                src_mac,
                src,
                dst,
                sport,
                dport,
                tos,
                ttl,
                df,
                flow_label: fl & 0xfffff,
                ip_opts: if v6 { Vec::new() } else { ipo },
                tcp_opts: tcpo,
                ack,
                window,
            },
        )
}

/// A flow as a client's stack would send it in segments we may coalesce: no IPv4 options.
pub fn plain_flow(v6: bool) -> impl Strategy<Value = Flow> {
    flow(v6).prop_map(|mut f| {
        f.ip_opts.clear();
        f
    })
}

/// Frames that are never coalesced and never changed: ARP, DHCP discover (UDP 68→67), ICMP echo.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f.resize(60, 0);
    f
}

pub fn dhcp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    crate::wire::udp::write_ipv4_udp(
        &mut out,
        (std::net::Ipv4Addr::UNSPECIFIED, 68),
        (std::net::Ipv4Addr::BROADCAST, 67),
        &[1u8; 300],
    );
    out
}

pub fn icmp() -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
    let c = !ref_fold(ref_sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend((0..56).map(|i| i as u8));
    let c = !ref_fold(ref_sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// A fixed flow for unit tests.
pub fn fixed_flow(v6: bool) -> Flow {
    Flow {
        v6,
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_mac: [2, 0, 0, 0, 0, 1],
        src: [10, 0, 0, 2, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        dst: [10, 0, 0, 1, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        sport: 40000,
        dport: 5201,
        tos: 0,
        ttl: 64,
        df: true,
        flow_label: 0x12345,
        ip_opts: Vec::new(),
        tcp_opts: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        ack: 1000,
        window: 502,
    }
}
