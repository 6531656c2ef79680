//! TAP → client: a frame read from the TAP behind its `virtio_net_hdr` becomes the real
//! Ethernet frames a client may see (software GSO). A `Plan` validates the frame's geometry
//! once; the caller then asks each output frame's length and has it written straight into its
//! own buffer (behind room for a WebSocket header), so nothing is allocated or staged here.
//!
//! - No GSO, no NEEDS_CSUM: one frame, byte-identical ("passthrough"; the caller need not copy).
//! - No GSO, NEEDS_CSUM (CHECKSUM_PARTIAL): one frame whose checksum is completed, as
//!   `skb_checksum_help` does: the fold of the sum from `csum_start` to the end (the kernel put
//!   the pseudo-header sum in the field) goes to `csum_start + csum_offset`; 0 becomes 0xffff.
//!   `complete_checksum` does it in place.
//! - TSO (TCPv4/TCPv6, with or without ECN) and USO (UDP over IPv4/IPv6): segments of
//!   `gso_size` payload bytes, the last one shorter, each with its own IP length, IPv4
//!   identification (first + i) and header checksum, and a full L4 checksum; TCP sequence
//!   numbers advance, FIN and PSH stay on the last segment, CWR on the first. The checksums of
//!   each segment are the sums of the header fields all segments share (taken once per frame)
//!   plus its own length, id, sequence number and flags, and its payload: the headers written
//!   are never read back (a load right after the stores to the same bytes waits for them).
//!
//! The geometry comes from the packet itself (IHL, TCP data offset, IP length); `csum_start` and
//! `csum_offset` must agree with it. `hdr_len` is ignored: the kernel fills it with its linear
//! length, a hint. Anything inconsistent, truncated or unsupported (UFO, VLAN tags, IPv6
//! extension headers) is an `Error`, never a panic.

use super::headers::{self, be16, put16, ETH_LEN, PROTO_TCP, PROTO_UDP, TCP_CWR, TCP_FIN, TCP_PSH};
use super::vnet::{VnetHdr, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use crate::wire::checksum;

/// Most segments one frame may become: a 64 KiB frame at Linux's smallest MSS (48) is 1366.
pub const MAX_SEGMENTS: usize = 2048;

/// Why a frame from the TAP cannot be turned into frames for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Segmentation asked of something that is not IPv4/IPv6 (ARP, a VLAN tag, ...).
    NotIp,
    /// A malformed header: IP version, IHL, IPv4 total length under the header, TCP data offset.
    BadHeader,
    /// The frame is shorter than its headers, or than its IP length.
    Truncated,
    /// Bytes after the IP length (for segmentation), or an IPv6 jumbogram.
    BadLength,
    /// An IPv4 fragment cannot be segmented.
    Fragment,
    /// The L4 protocol is not the one the GSO type names (an IPv6 extension header included).
    WrongProtocol,
    /// `csum_start`/`csum_offset` outside the frame or, for GSO, not at the L4 checksum.
    BadChecksumOffset,
    /// UFO, ECN on UDP, or an unknown GSO type.
    UnsupportedGso,
    /// GSO with a `gso_size` of 0.
    ZeroGsoSize,
    /// GSO of a packet without payload.
    NoPayload,
    /// More than `MAX_SEGMENTS` segments.
    TooManySegments,
    /// `complete_checksum` on a frame that needs segmentation.
    NeedsSegmentation,
}

impl Error {
    /// A short name, for counters and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Error::NotIp => "not_ip",
            Error::BadHeader => "bad_header",
            Error::Truncated => "truncated",
            Error::BadLength => "bad_length",
            Error::Fragment => "fragment",
            Error::WrongProtocol => "wrong_protocol",
            Error::BadChecksumOffset => "bad_checksum_offset",
            Error::UnsupportedGso => "unsupported_gso",
            Error::ZeroGsoSize => "zero_gso_size",
            Error::NoPayload => "no_payload",
            Error::TooManySegments => "too_many_segments",
            Error::NeedsSegmentation => "needs_segmentation",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Passthrough,
    /// Complete the checksum summed from `start`, stored at `field`.
    Checksum {
        start: usize,
        field: usize,
    },
    Tcp,
    Udp,
}

/// The validated geometry of one frame from the TAP: how many frames it becomes and how long
/// each is. Only valid with the frame it was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    kind: Kind,
    frame_len: usize,
    v6: bool,
    /// Offset of the L4 header.
    l4: usize,
    /// Header bytes repeated in every segment (Ethernet to the end of the L4 header).
    hdr_len: usize,
    gso_size: usize,
    count: usize,
    /// Sums of the header fields every segment shares, taken once from the frame so that no
    /// segment's checksums are summed back from the bytes just written (which stalls on store
    /// forwarding): the IPv4 header with its length, identification and checksum as zeros, and
    /// the pseudo-header's addresses and protocol plus the L4 header with its checksum and
    /// (TCP) sequence number and flags word, or (UDP) length, as zeros. Each segment adds its
    /// own values of those fields, which gives the same sum as summing its header would.
    ip_sum: u32,
    l4_sum: u32,
}

/// Check `frame` against `hdr` and work out what it becomes.
pub fn plan(hdr: &VnetHdr, frame: &[u8]) -> Result<Plan, Error> {
    let one = |kind| Plan {
        kind,
        frame_len: frame.len(),
        v6: false,
        l4: 0,
        hdr_len: 0,
        gso_size: 0,
        count: 1,
        ip_sum: 0,
        l4_sum: 0,
    };
    let ecn = hdr.gso_type & GSO_ECN != 0;
    let (proto, v6) = match hdr.gso_type & !GSO_ECN {
        GSO_NONE if ecn => return Err(Error::UnsupportedGso),
        GSO_NONE if !hdr.needs_csum() => return Ok(one(Kind::Passthrough)),
        GSO_NONE => {
            let (start, field) = checksum_span(hdr, frame.len())?;
            return Ok(one(Kind::Checksum { start, field }));
        }
        GSO_TCPV4 => (PROTO_TCP, Some(false)),
        GSO_TCPV6 => (PROTO_TCP, Some(true)),
        GSO_UDP_L4 if !ecn => (PROTO_UDP, None),
        _ => return Err(Error::UnsupportedGso),
    };
    let ip = headers::ip(frame)?;
    if ip.proto != proto || v6.is_some_and(|v6| v6 != ip.v6) {
        return Err(Error::WrongProtocol);
    }
    if ip.end != frame.len() {
        return Err(Error::BadLength);
    }
    let (l4_hdr, csum_offset) = if proto == PROTO_TCP {
        if ip.l4 + headers::TCP_MIN > ip.end {
            return Err(Error::Truncated);
        }
        let doff = usize::from(frame[ip.l4 + 12] >> 4) * 4;
        if doff < headers::TCP_MIN {
            return Err(Error::BadHeader);
        }
        (doff, headers::TCP_CSUM)
    } else {
        (headers::UDP_LEN, headers::UDP_CSUM)
    };
    let hdr_len = ip.l4 + l4_hdr;
    if hdr_len > ip.end {
        return Err(Error::Truncated);
    }
    if hdr.needs_csum() && (usize::from(hdr.csum_start) != ip.l4 || usize::from(hdr.csum_offset) != csum_offset) {
        return Err(Error::BadChecksumOffset);
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(Error::ZeroGsoSize);
    }
    let payload = ip.end - hdr_len;
    if payload == 0 {
        return Err(Error::NoPayload);
    }
    let count = payload.div_ceil(gso_size);
    if count > MAX_SEGMENTS {
        return Err(Error::TooManySegments);
    }
    let kind = if proto == PROTO_TCP { Kind::Tcp } else { Kind::Udp };
    let (ip_sum, l4_sum) = shared_sums(frame, ip.v6, ip.l4, hdr_len, kind);
    Ok(Plan { kind, frame_len: frame.len(), v6: ip.v6, l4: ip.l4, hdr_len, gso_size, count, ip_sum, l4_sum })
}

/// The sums of the header fields all segments share (see [`Plan`]): the fields that differ are
/// zeroed in a copy of the headers (at most 60 + 60 bytes), which then is summed.
fn shared_sums(frame: &[u8], v6: bool, l4: usize, hdr_len: usize, kind: Kind) -> (u32, u32) {
    let mut ip_sum = 0;
    if !v6 {
        let mut h = [0u8; 60];
        let h = &mut h[..l4 - ETH_LEN];
        h.copy_from_slice(&frame[ETH_LEN..l4]);
        h[2..6].fill(0); // total length, identification
        h[10..12].fill(0); // header checksum
        ip_sum = checksum::accumulate(0, h);
    }
    let mut h = [0u8; 60];
    let h = &mut h[..hdr_len - l4];
    h.copy_from_slice(&frame[l4..hdr_len]);
    if kind == Kind::Tcp {
        h[headers::TCP_SEQ..headers::TCP_SEQ + 4].fill(0);
        h[headers::TCP_FLAGS - 1..headers::TCP_FLAGS + 1].fill(0); // data offset and flags
        h[headers::TCP_CSUM..headers::TCP_CSUM + 2].fill(0);
    } else {
        h[4..6].fill(0); // length
        h[headers::UDP_CSUM..headers::UDP_CSUM + 2].fill(0);
    }
    let proto = if kind == Kind::Tcp { PROTO_TCP } else { PROTO_UDP };
    let l4_sum = checksum::accumulate(headers::pseudo(frame, v6, proto, 0), h);
    (ip_sum, l4_sum)
}

/// Where a CHECKSUM_PARTIAL checksum starts and where it goes, if both lie inside the IP part.
fn checksum_span(hdr: &VnetHdr, len: usize) -> Result<(usize, usize), Error> {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if start < ETH_LEN || field + 2 > len {
        return Err(Error::BadChecksumOffset);
    }
    Ok((start, field))
}

/// Complete a CHECKSUM_PARTIAL checksum in place (see the module comment). A frame without
/// NEEDS_CSUM is left alone; one that asks for segmentation is an error.
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), Error> {
    if hdr.is_gso() || hdr.gso_type & GSO_ECN != 0 {
        return Err(Error::NeedsSegmentation);
    }
    if hdr.needs_csum() {
        let (start, field) = checksum_span(hdr, frame.len())?;
        complete(frame, start, field);
    }
    Ok(())
}

fn complete(frame: &mut [u8], start: usize, field: usize) {
    let c = checksum::finish(checksum::accumulate(0, &frame[start..]));
    put16(frame, field, if c == 0 { 0xffff } else { c });
}

impl Plan {
    /// How many frames this one becomes (1 without GSO).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The one output frame is the input frame, unchanged: no need to copy it anywhere.
    pub fn is_passthrough(&self) -> bool {
        self.kind == Kind::Passthrough
    }

    /// Length of output frame `i` (`i < count()`).
    pub fn seg_len(&self, i: usize) -> usize {
        assert!(i < self.count, "segment {i} of {}", self.count);
        match self.kind {
            Kind::Passthrough | Kind::Checksum { .. } => self.frame_len,
            Kind::Tcp | Kind::Udp => {
                let payload = self.frame_len - self.hdr_len;
                self.hdr_len + (payload - i * self.gso_size).min(self.gso_size)
            }
        }
    }

    /// Total length of all output frames.
    pub fn total_len(&self) -> usize {
        match self.kind {
            Kind::Passthrough | Kind::Checksum { .. } => self.frame_len,
            Kind::Tcp | Kind::Udp => self.frame_len + (self.count - 1) * self.hdr_len,
        }
    }

    /// Write output frame `i` — a complete Ethernet frame with valid checksums — to
    /// `out[..seg_len(i)]` and return its length. `frame` must be the frame planned; panics if
    /// its length differs, if `i >= count()` or if `out` is shorter than `seg_len(i)`.
    pub fn write(&self, frame: &[u8], i: usize, out: &mut [u8]) -> usize {
        assert_eq!(frame.len(), self.frame_len, "not the planned frame");
        let n = self.seg_len(i);
        let out = &mut out[..n];
        match self.kind {
            Kind::Passthrough => out.copy_from_slice(frame),
            Kind::Checksum { start, field } => {
                out.copy_from_slice(frame);
                complete(out, start, field);
            }
            Kind::Tcp | Kind::Udp => self.write_segment(frame, i, out),
        }
        n
    }

    fn write_segment(&self, frame: &[u8], i: usize, out: &mut [u8]) {
        let (h, l4, n) = (self.hdr_len, self.l4, out.len());
        // The sums are the planned frame's: another frame of the same length would get wrong ones.
        debug_assert_eq!(
            shared_sums(frame, self.v6, l4, h, self.kind),
            (self.ip_sum, self.l4_sum),
            "not the planned frame"
        );
        let from = h + i * self.gso_size;
        let payload = &frame[from..from + (n - h)];
        out[..h].copy_from_slice(&frame[..h]);
        out[h..].copy_from_slice(payload);
        // Only stores into `out` from here on: every sum comes from the plan and the values
        // written (see `Plan`), never from reading back what was just written.
        if self.v6 {
            put16(out, ETH_LEN + 4, (n - ETH_LEN - headers::IPV6_LEN) as u16);
        } else {
            let len = (n - ETH_LEN) as u16;
            let id = be16(frame, ETH_LEN + 4).wrapping_add(i as u16);
            put16(out, ETH_LEN + 2, len);
            put16(out, ETH_LEN + 4, id);
            put16(out, ETH_LEN + 10, checksum::finish(self.ip_sum + u32::from(len) + u32::from(id)));
        }
        let l4_len = (n - l4) as u32;
        // The pseudo-header's length (the plan's sum holds its addresses and protocol).
        let mut sum = self.l4_sum + (l4_len >> 16) + (l4_len & 0xffff);
        let field = if self.kind == Kind::Tcp {
            let seq = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().expect("4 bytes"));
            let seq = seq.wrapping_add((i * self.gso_size) as u32);
            out[l4 + headers::TCP_SEQ..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut flags = frame[l4 + headers::TCP_FLAGS];
            if i + 1 < self.count {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                flags &= !TCP_CWR;
            }
            out[l4 + headers::TCP_FLAGS] = flags;
            let word = u16::from_be_bytes([frame[l4 + headers::TCP_FLAGS - 1], flags]);
            sum += (seq >> 16) + (seq & 0xffff) + u32::from(word);
            l4 + headers::TCP_CSUM
        } else {
            put16(out, l4 + 4, l4_len as u16);
            sum += l4_len;
            l4 + headers::UDP_CSUM
        };
        // The L4 header is a multiple of 4 bytes long, so the payload's sum chains onto it.
        let c = checksum::finish(checksum::accumulate(sum, payload));
        // UDP reserves 0 for "no checksum"; TCP keeps what the fold gives, as Linux's GSO does.
        put16(out, field, if c == 0 && self.kind == Kind::Udp { 0xffff } else { c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::coalesce::{Candidate, Coalescer, Push, MAX_FRAME, STAGE_LEN};
    use crate::offload::testkit::{self, fixed_flow, read, Csum, Flow, L4};
    use crate::offload::vnet::{F_DATA_VALID, GSO_UDP};
    use proptest::prelude::*;

    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;
    const FIN: u8 = 0x01;
    const CWR: u8 = 0x80;

    /// All output frames of `frame`, checking the plan's lengths as it goes.
    fn segments(hdr: &VnetHdr, frame: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        let p = plan(hdr, frame)?;
        let mut out = Vec::new();
        let mut total = 0;
        for i in 0..p.count() {
            let mut buf = vec![0xee; p.seg_len(i) + 3];
            assert_eq!(p.write(frame, i, &mut buf), p.seg_len(i));
            assert!(buf[p.seg_len(i)..].iter().all(|b| *b == 0xee), "wrote past seg_len");
            buf.truncate(p.seg_len(i));
            total += buf.len();
            out.push(buf);
        }
        assert_eq!(total, p.total_len());
        Ok(out)
    }

    fn payload(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }

    /// Everything a segment may differ in from the super-frame, zeroed: IP length, id and
    /// checksum; TCP seq, flags, checksum; UDP length and checksum.
    fn masked_header(f: &[u8], flow: &Flow, l4: L4) -> Vec<u8> {
        let mut h = f[..flow.hdr_len(l4)].to_vec();
        if flow.v6 {
            h[18..20].fill(0);
        } else {
            h[16..20].fill(0);
            h[24..26].fill(0);
        }
        let t = 14 + flow.ip_hdr_len();
        match l4 {
            L4::Tcp { .. } => {
                h[t + 4..t + 8].fill(0);
                h[t + 13] = 0;
                h[t + 16..t + 18].fill(0);
            }
            L4::Udp => h[t + 4..t + 8].fill(0),
        }
        h
    }

    #[test]
    fn frames_without_offload_pass_unchanged() {
        let f = fixed_flow(false);
        let tcp = f.frame(L4::Tcp { seq: 1, flags: ACK }, 7, &payload(100, 1), Csum::Full);
        let tcp_bad_csum = {
            let mut t = tcp.clone();
            t[60] ^= 1;
            t
        };
        for frame in [testkit::arp(), testkit::dhcp(), testkit::icmp(), tcp, tcp_bad_csum, vec![0u8; 14], vec![]] {
            for hdr in [VnetHdr::default(), VnetHdr { flags: F_DATA_VALID, ..VnetHdr::default() }] {
                let p = plan(&hdr, &frame).unwrap();
                assert!(p.is_passthrough());
                assert_eq!(segments(&hdr, &frame).unwrap(), vec![frame.clone()]);
                let mut copy = frame.clone();
                complete_checksum(&hdr, &mut copy).unwrap();
                assert_eq!(copy, frame);
            }
        }
    }

    #[test]
    fn checksum_partial_is_completed() {
        for v6 in [false, true] {
            let f = fixed_flow(v6);
            for l4 in [L4::Tcp { seq: 9, flags: ACK | PSH }, L4::Udp] {
                for n in [0, 1, 2, 3, 1000, 1401] {
                    let partial = f.frame(l4, 3, &payload(n, 5), Csum::Partial);
                    let mut hdr = f.gso_hdr(l4, 0, false);
                    hdr.gso_type = GSO_NONE;
                    let out = segments(&hdr, &partial).unwrap();
                    assert_eq!(out.len(), 1);
                    assert!(!plan(&hdr, &partial).unwrap().is_passthrough());
                    read(&out[0]);
                    let full = f.frame(l4, 3, &payload(n, 5), Csum::Full);
                    let at = usize::from(hdr.csum_start + hdr.csum_offset);
                    if full[at..at + 2] != [0, 0] {
                        assert_eq!(out[0], full); // (a TCP checksum of 0 is sent as 0xffff, as Linux does)
                    }
                    let mut in_place = partial.clone();
                    complete_checksum(&hdr, &mut in_place).unwrap();
                    assert_eq!(in_place, out[0]);
                }
            }
        }
    }

    #[test]
    fn completed_zero_checksum_is_sent_as_ffff() {
        // A UDP datagram whose checksum comes out 0: find a payload word that makes it so.
        let f = fixed_flow(false);
        let mut hdr = f.gso_hdr(L4::Udp, 0, false);
        hdr.gso_type = GSO_NONE;
        let mut found = false;
        for w in 0..=0xffffu16 {
            let mut fr = f.frame(L4::Udp, 1, &w.to_be_bytes(), Csum::Partial);
            complete_checksum(&hdr, &mut fr).unwrap();
            read(&fr);
            if fr[40..42] == [0xff, 0xff] {
                found = true;
            }
            assert_ne!(fr[40..42], [0, 0]);
        }
        assert!(found);
    }

    #[test]
    fn tcp4_super_frame_segments() {
        let f = fixed_flow(false);
        let data = payload(4000, 3);
        let sup = f.frame(L4::Tcp { seq: u32::MAX - 1000, flags: ACK | PSH | FIN | CWR }, 0xffff, &data, Csum::Partial);
        let hdr = f.gso_hdr(L4::Tcp { seq: 0, flags: 0 }, 1448, true);
        let segs = segments(&hdr, &sup).unwrap();
        assert_eq!(segs.len(), 3);
        let lens: Vec<usize> = segs.iter().map(|s| s.len() - f.hdr_len(L4::Tcp { seq: 0, flags: 0 })).collect();
        assert_eq!(lens, [1448, 1448, 1104]);
        let seen: Vec<_> = segs.iter().map(|s| read(s)).collect();
        assert_eq!(seen.iter().map(|s| s.id).collect::<Vec<_>>(), [0xffff, 0, 1]);
        assert_eq!(seen.iter().map(|s| s.seq).collect::<Vec<_>>(), [u32::MAX - 1000, 447, 1895]);
        assert_eq!(seen.iter().map(|s| s.flags).collect::<Vec<_>>(), [ACK | CWR, ACK, ACK | PSH | FIN]);
    }

    /// A super-frame the way the kernel hands it over: pseudo-header sum in the TCP/UDP field.
    fn super_frame(flow: &Flow, l4: L4, id: u16, data: &[u8], gso: u16, ecn: bool) -> (VnetHdr, Vec<u8>) {
        (flow.gso_hdr(l4, gso, ecn), flow.frame(l4, id, data, Csum::Partial))
    }

    /// Segments of a random super-frame: each verifies on its own (reference checksums and
    /// lengths), the payloads concatenate to the super-frame's, headers are the super-frame's
    /// but for the fields that must change, and those change as Linux's GSO changes them.
    fn check_segmentation(flow: &Flow, l4: L4, id: u16, data: &[u8], gso: u16, ecn: bool) -> Vec<Vec<u8>> {
        let (hdr, sup) = super_frame(flow, l4, id, data, gso, ecn);
        let segs = segments(&hdr, &sup).unwrap();
        let g = usize::from(gso);
        assert_eq!(segs.len(), data.len().div_ceil(g));
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let seen = read(s);
            let last = i + 1 == segs.len();
            let p = &s[seen.payload_at..];
            assert_eq!(p.len(), if last { data.len() - i * g } else { g });
            joined.extend_from_slice(p);
            assert_eq!(masked_header(s, flow, l4), masked_header(&sup, flow, l4));
            if !flow.v6 {
                assert_eq!(seen.id, id.wrapping_add(i as u16));
            }
            if let L4::Tcp { seq, flags } = l4 {
                assert_eq!(seen.seq, seq.wrapping_add((i * g) as u32));
                let mut want = flags;
                if !last {
                    want &= !(FIN | PSH);
                }
                if i > 0 {
                    want &= !CWR;
                }
                assert_eq!(seen.flags, want);
            }
        }
        assert_eq!(joined, data);
        segs
    }

    fn tcp_case() -> impl Strategy<Value = (Flow, u32, u8, u16, Vec<u8>, u16, bool)> {
        (
            any::<bool>().prop_flat_map(testkit::flow),
            any::<u32>(),
            any::<u8>(),
            any::<u16>(),
            1usize..9000,
            5u16..2000,
            any::<bool>(),
        )
            .prop_map(|(f, seq, flags, id, n, gso, ecn)| (f, seq, flags, id, payload(n, seq as u8), gso, ecn))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn tcp_super_frames_segment_correctly((flow, seq, flags, id, data, gso, ecn) in tcp_case()) {
            check_segmentation(&flow, L4::Tcp { seq, flags }, id, &data, gso, ecn);
        }

        #[test]
        fn udp_super_frames_segment_correctly(flow in any::<bool>().prop_flat_map(testkit::flow), id: u16, n in 1usize..9000, gso in 5u16..2000) {
            check_segmentation(&flow, L4::Udp, id, &payload(n, id as u8), gso, false);
        }

        /// A 64 KiB TSO frame at a typical MSS.
        #[test]
        fn big_super_frames(flow in any::<bool>().prop_flat_map(testkit::plain_flow), seq: u32, gso in 500u16..=1460) {
            let flow = Flow { tcp_opts: flow.tcp_opts[..flow.tcp_opts.len().min(12)].to_vec(), ..flow };
            let n = 65535 - flow.ip_hdr_len() - flow.l4_hdr_len(L4::Tcp { seq, flags: ACK });
            check_segmentation(&flow, L4::Tcp { seq, flags: ACK }, 1, &payload(n, 1), gso, false);
        }

        /// Coalescing the segments again gives back the super-frame and its vnet header, byte
        /// for byte (the kernel's convention for the checksum field is ours too).
        #[test]
        fn segments_coalesce_back(flow in any::<bool>().prop_flat_map(testkit::plain_flow), seq: u32, psh: bool, id: u16, gso in 1u16..1500, k in 2usize..=64, short in 0usize..1500) {
            let g = usize::from(gso);
            let n = (k - 1) * g + 1 + short % g;
            let flags = if psh { ACK | PSH } else { ACK };
            let l4 = L4::Tcp { seq, flags };
            let (hdr, sup) = super_frame(&flow, l4, id, &payload(n, 9), gso, false);
            prop_assume!(sup.len() - 14 <= 65535);
            let segs = segments(&hdr, &sup).unwrap();
            prop_assert_eq!(segs.len(), k);
            prop_assume!(segs[0].len() <= MAX_FRAME);
            let mut stage = vec![0u8; STAGE_LEN];
            let mut c = Coalescer::new();
            for (i, s) in segs.iter().enumerate() {
                let cand = Candidate::parse(s).expect("a segment is a candidate");
                let got = c.push(&mut stage, s, &cand);
                if i + 1 < k {
                    prop_assert_eq!(got, Push::Staged);
                } else if psh || s.len() < segs[0].len() || k == 64 {
                    prop_assert_eq!(got, Push::Full);
                } else {
                    prop_assert!(got == Push::Staged || got == Push::Full);
                }
            }
            let len = c.finish(&mut stage);
            let mut want = vec![0u8; VnetHdr::LEN];
            hdr.write(&mut want);
            want.extend_from_slice(&sup);
            prop_assert_eq!(&stage[..len], &want[..]);
        }

        /// Whatever `plan` accepts — here mutations of valid super-frames under random vnet
        /// headers — comes out as frames whose every length and checksum is right, and nothing
        /// panics on the way.
        #[test]
        fn mutated_input_never_panics((flow, seq, flags, id, data, gso, ecn) in tcp_case(), udp: bool, hdr_bytes: [u8; 10], use_hdr: bool, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4), cut in any::<usize>()) {
            let l4 = if udp { L4::Udp } else { L4::Tcp { seq, flags } };
            let (mut hdr, mut sup) = super_frame(&flow, l4, id, &data[..data.len().min(3000)], gso, ecn);
            if use_hdr {
                hdr = VnetHdr::parse(&hdr_bytes).unwrap();
            }
            for (at, x) in flips {
                let at = at % sup.len().min(140);
                sup[at] ^= x;
            }
            if cut % 4 == 0 {
                sup.truncate(cut / 4 % (sup.len() + 1));
            }
            if let Ok(segs) = segments(&hdr, &sup) {
                let p = plan(&hdr, &sup).unwrap();
                if hdr.is_gso() {
                    segs.iter().for_each(|s| { read(s); });
                } else {
                    prop_assert_eq!(segs.len(), 1);
                    prop_assert_eq!(p.is_passthrough(), segs[0] == sup && !hdr.needs_csum());
                }
            }
            let mut copy = sup.clone();
            let _ = complete_checksum(&hdr, &mut copy);
        }

        #[test]
        fn arbitrary_bytes_never_panic(hdr: [u8; 10], frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            let hdr = VnetHdr::parse(&hdr).unwrap();
            let _ = segments(&hdr, &frame);
            let mut copy = frame.clone();
            let _ = complete_checksum(&hdr, &mut copy);
        }
    }

    /// One reason per rejection, each from an otherwise valid super-frame.
    #[test]
    fn rejections() {
        let f4 = fixed_flow(false);
        let f6 = fixed_flow(true);
        let tcp = L4::Tcp { seq: 1, flags: ACK };
        let data = payload(3000, 1);
        let (h4, s4) = super_frame(&f4, tcp, 1, &data, 1448, false);
        let (h6, s6) = super_frame(&f6, tcp, 1, &data, 1448, false);
        let (hu, su) = super_frame(&f4, L4::Udp, 1, &data, 1000, false);
        assert!(plan(&h4, &s4).is_ok() && plan(&h6, &s6).is_ok() && plan(&hu, &su).is_ok());
        let with = |h: &VnetHdr, s: &[u8], edit: &dyn Fn(&mut VnetHdr, &mut Vec<u8>)| {
            let (mut h, mut s) = (*h, s.to_vec());
            edit(&mut h, &mut s);
            let r = plan(&h, &s).map(|_| ());
            let mut copy = s.clone();
            // complete_checksum refuses everything GSO, and checks the offsets of the rest.
            if h.is_gso() {
                assert_eq!(complete_checksum(&h, &mut copy), Err(Error::NeedsSegmentation));
            }
            r.err()
        };
        use Error::*;
        // Not IP: ARP, a VLAN tag in front of IPv4.
        assert_eq!(with(&h4, &testkit::arp(), &|_, _| {}), Some(NotIp));
        assert_eq!(
            with(&h4, &s4, &|_, s| {
                s.splice(12..12, [0x81, 0, 0, 5]);
            }),
            Some(NotIp)
        );
        // Bad headers: IP version, IHL under 5, IPv4 total length under the header, TCP data offset under 5.
        assert_eq!(with(&h4, &s4, &|_, s| s[14] = 0x65), Some(BadHeader));
        assert_eq!(with(&h4, &s4, &|_, s| s[14] = 0x44), Some(BadHeader));
        assert_eq!(with(&h4, &s4, &|_, s| s[16..18].copy_from_slice(&[0, 19])), Some(BadHeader));
        assert_eq!(with(&h6, &s6, &|_, s| s[14] = 0x40), Some(BadHeader));
        assert_eq!(with(&h4, &s4, &|_, s| s[34 + 12] = 0x40), Some(BadHeader));
        // Truncated: inside the IP header, the IP length past the end, the TCP header cut.
        assert_eq!(with(&h4, &s4, &|_, s| s.truncate(30)), Some(Truncated));
        assert_eq!(with(&h6, &s6, &|_, s| s.truncate(50)), Some(Truncated));
        assert_eq!(with(&h4, &s4, &|_, s| s.truncate(s.len() - 1)), Some(Truncated));
        assert_eq!(with(&h6, &s6, &|_, s| s.truncate(s.len() - 1)), Some(Truncated));
        assert_eq!(
            with(&h4, &s4, &|_, s| {
                s.truncate(34 + 10);
                s[16..18].copy_from_slice(&30u16.to_be_bytes());
            }),
            Some(Truncated)
        );
        assert_eq!(
            with(&h4, &s4, &|_, s| {
                s.truncate(34 + 24);
                s[16..18].copy_from_slice(&44u16.to_be_bytes()); // options say 32 bytes of TCP header
            }),
            Some(Truncated)
        );
        assert_eq!(with(&h4, &s4, &|_, s| s.truncate(5)), Some(Truncated));
        // Bad length: bytes after the IP length, an IPv6 jumbogram.
        assert_eq!(with(&h4, &s4, &|_, s| s.push(0)), Some(BadLength));
        assert_eq!(with(&h6, &s6, &|_, s| s[18..20].fill(0)), Some(BadLength));
        // Fragments: MF, or an offset.
        assert_eq!(with(&h4, &s4, &|_, s| s[20] |= 0x20), Some(Fragment));
        assert_eq!(with(&h4, &s4, &|_, s| s[21] = 1), Some(Fragment));
        // Wrong protocol: TSO4 of IPv6, TSO6 of IPv4, TSO of UDP, USO of TCP, IPv6 with a hop-by-hop header.
        assert_eq!(with(&h4, &s6, &|_, _| {}), Some(WrongProtocol));
        assert_eq!(with(&h6, &s4, &|_, _| {}), Some(WrongProtocol));
        assert_eq!(with(&h4, &su, &|h, _| h.csum_offset = 6), Some(WrongProtocol));
        assert_eq!(with(&hu, &s4, &|_, _| {}), Some(WrongProtocol));
        assert_eq!(with(&h6, &s6, &|_, s| s[20] = 0), Some(WrongProtocol));
        // Checksum offsets: GSO not at the L4 checksum; CHECKSUM_PARTIAL outside the frame or in the Ethernet header.
        assert_eq!(with(&h4, &s4, &|h, _| h.csum_start += 2), Some(BadChecksumOffset));
        assert_eq!(with(&h4, &s4, &|h, _| h.csum_offset = 6), Some(BadChecksumOffset));
        assert_eq!(with(&hu, &su, &|h, _| h.csum_offset = 16), Some(BadChecksumOffset));
        let none = VnetHdr { gso_type: GSO_NONE, ..h4 };
        assert_eq!(with(&none, &s4, &|h, s| h.csum_start = s.len() as u16 - 1), Some(BadChecksumOffset));
        assert_eq!(with(&none, &s4, &|h, s| h.csum_offset = (s.len() - 35) as u16), Some(BadChecksumOffset));
        assert_eq!(with(&none, &s4, &|h, s| h.csum_offset = (s.len() - 36) as u16), None); // the last two bytes
        assert_eq!(with(&none, &s4, &|h, _| h.csum_start = 13), Some(BadChecksumOffset));
        assert_eq!(with(&none, &s4, &|h, _| h.csum_start = u16::MAX), Some(BadChecksumOffset));
        assert_eq!(with(&none, &s4, &|h, _| h.csum_offset = u16::MAX), Some(BadChecksumOffset));
        let mut copy = s4.clone();
        assert_eq!(
            complete_checksum(&VnetHdr { csum_start: s4.len() as u16, ..none }, &mut copy),
            Err(BadChecksumOffset)
        );
        assert_eq!(copy, s4, "a refused frame is left alone");
        // Unsupported GSO: UFO, unknown types, ECN on UDP or on nothing.
        assert_eq!(with(&hu, &su, &|h, _| h.gso_type = GSO_UDP), Some(UnsupportedGso));
        for t in [2, 6, 7, 0x7f, 0x81 + 5] {
            assert_eq!(with(&h4, &s4, &|h, _| h.gso_type = t), Some(UnsupportedGso));
        }
        assert_eq!(with(&hu, &su, &|h, _| h.gso_type |= GSO_ECN), Some(UnsupportedGso));
        assert_eq!(with(&h4, &s4, &|h, _| h.gso_type = GSO_ECN), Some(UnsupportedGso));
        // gso_size 0, no payload, too many segments.
        assert_eq!(with(&h4, &s4, &|h, _| h.gso_size = 0), Some(ZeroGsoSize));
        let empty = f4.frame(tcp, 1, &[], Csum::Partial);
        assert_eq!(with(&h4, &empty, &|_, _| {}), Some(NoPayload));
        assert_eq!(with(&h4, &s4, &|h, _| h.gso_size = 1), Some(TooManySegments));
        assert_eq!(with(&h4, &s4, &|h, _| h.gso_size = 2), Ok::<(), Error>(()).err());
        // hdr_len is only a hint: any value is accepted.
        assert_eq!(with(&h4, &s4, &|h, _| h.hdr_len = 0), None);
        assert_eq!(with(&h4, &s4, &|h, _| h.hdr_len = u16::MAX), None);
        // A GSO frame without NEEDS_CSUM is still segmented (its offsets are not looked at).
        assert_eq!(with(&h4, &s4, &|h, _| (h.flags, h.csum_start) = (0, 0)), None);
        assert_eq!(Error::TooManySegments.to_string(), "too_many_segments");
    }

    #[test]
    fn segment_count_bound() {
        let f = fixed_flow(false);
        let tcp = L4::Tcp { seq: 1, flags: ACK };
        let (h, s) = super_frame(&f, tcp, 1, &payload(MAX_SEGMENTS, 1), 1, false);
        assert_eq!(plan(&h, &s).unwrap().count(), MAX_SEGMENTS);
        let (h, s) = super_frame(&f, tcp, 1, &payload(MAX_SEGMENTS + 1, 1), 1, false);
        assert_eq!(plan(&h, &s), Err(Error::TooManySegments));
        // One segment when the payload fits in gso_size: still checksummed in full.
        let (h, s) = super_frame(&f, tcp, 1, &payload(100, 1), 1448, false);
        let segs = segments(&h, &s).unwrap();
        assert_eq!(segs, vec![f.frame(tcp, 1, &payload(100, 1), Csum::Full)]);
    }
}
