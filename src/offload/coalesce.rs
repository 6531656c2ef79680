//! Client → TAP: consecutive segments of one TCP flow merged into one super-frame written to
//! the TAP once with a GSO `virtio_net_hdr` (software GRO); injecting each 1514-byte frame on
//! its own costs the kernel a few microseconds apiece.
//!
//! The staged bytes live in a buffer the caller owns (`STAGE_LEN` bytes): the vnet header at
//! `stage[..10]`, the super-frame after it. A `Coalescer` holds only the batch's bookkeeping.
//! For each frame the event loop parses, in order:
//!
//! ```text
//! match Candidate::parse(frame) {
//!     None => { if !c.is_empty() { write(&stage[..c.finish(stage)]) }  write_vectored([vnet::ZERO, frame]) }
//!     Some(seg) => loop {
//!         match c.push(stage, frame, &seg) {
//!             Push::Staged => break,
//!             Push::Full => { write(&stage[..c.finish(stage)]); break }
//!             Push::Flush => write(&stage[..c.finish(stage)]),    // then push again
//!             Push::Alone => { write_vectored([vnet::ZERO, frame]); break }
//!         }
//!     },
//! }
//! // at the end of the pass: if !c.is_empty() { write(&stage[..c.finish(stage)]) }
//! ```
//!
//! A batch of one frame goes out unchanged behind a zero header. A batch of two or more becomes
//! GSO_TCPV4/GSO_TCPV6 with NEEDS_CSUM (`csum_start` at the TCP header, `csum_offset` 16), the
//! first segment's payload length as `gso_size`, the IP length (and IPv4 header checksum)
//! covering the whole, the TCP checksum field holding the folded pseudo-header sum (what Linux
//! expects of CHECKSUM_PARTIAL), and PSH of the last segment.
//!
//! A candidate is IPv4 (IHL 5, not a fragment, valid header checksum) or IPv6 (next header
//! TCP), exactly as long as its IP length says (no Ethernet padding), TCP with flags ACK or
//! ACK|PSH, payload, and a valid TCP checksum: the client is untrusted, and a corrupt segment
//! must reach the peer corrupt rather than "repaired" by the checksum we would compute for it.
//! It is at most [`MAX_FRAME`] bytes long. It continues a batch when everything but the
//! sequence number, IPv4 identification, PSH and checksums is identical to the staged first
//! segment (Ethernet header, addresses, TOS/traffic class and flow label, TTL/hop limit, DF,
//! ports, ack, data offset, window, urgent pointer, option bytes), the sequence number and IPv4
//! identification follow on, and its
//! payload is at most `gso_size`; a PSH or shorter segment ends the batch, as do
//! `MAX_SEGMENTS` segments or an IP length that would pass 65535.

use super::headers::{self, be16, put16, ETH_LEN, IPV4_MIN, PROTO_TCP, TCP_ACK, TCP_PSH};
use super::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, ZERO};
use crate::wire::checksum;

/// Most segments in one batch.
pub const MAX_SEGMENTS: usize = 64;
/// Longest frame merged: the TAP's MTU (1500, which wsnic never changes) and the Ethernet
/// header. A longer one goes alone: the bridge drops a frame over a port's MTU, but forwards a
/// super-frame without checking its segments, which another TAP would then cut to `gso_size`
/// (and a physical port, on an adopted bridge, would be handed as is).
pub const MAX_FRAME: usize = ETH_LEN + 1500;
/// The staging buffer's size: a vnet header and the largest super-frame.
pub const STAGE_LEN: usize = VnetHdr::LEN + ETH_LEN + headers::MAX_IP_LEN;

/// A TCP segment that may be coalesced: parsed and verified by `Candidate::parse`, handed back
/// with the same frame to `Coalescer::push`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    len: usize,
    v6: bool,
    /// End of the TCP header: the payload starts here.
    hdr_len: usize,
    seq: u32,
    psh: bool,
}

impl Candidate {
    /// `frame` if it is a segment that may be coalesced (see the module comment).
    pub fn parse(frame: &[u8]) -> Option<Candidate> {
        if frame.len() > MAX_FRAME {
            return None;
        }
        let ip = headers::ip(frame).ok()?;
        if ip.end != frame.len() || ip.proto != PROTO_TCP {
            return None;
        }
        if !ip.v6 && (ip.l4 != ETH_LEN + IPV4_MIN || checksum::checksum(&frame[ETH_LEN..ip.l4]) != 0) {
            return None;
        }
        let l4 = ip.l4;
        if l4 + headers::TCP_MIN > frame.len() {
            return None;
        }
        let hdr_len = l4 + usize::from(frame[l4 + 12] >> 4) * 4;
        let flags = frame[l4 + headers::TCP_FLAGS];
        if hdr_len < l4 + headers::TCP_MIN || hdr_len >= frame.len() || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH)
        {
            return None;
        }
        let sum = headers::pseudo(frame, ip.v6, PROTO_TCP, frame.len() - l4);
        if checksum::finish(checksum::accumulate(sum, &frame[l4..])) != 0 {
            return None;
        }
        let seq = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().expect("4 bytes"));
        Some(Candidate { len: frame.len(), v6: ip.v6, hdr_len, seq, psh: flags & TCP_PSH != 0 })
    }

    fn payload_len(&self) -> usize {
        self.len - self.hdr_len
    }

    fn l4(&self) -> usize {
        ETH_LEN + if self.v6 { headers::IPV6_LEN } else { IPV4_MIN }
    }
}

/// What `Coalescer::push` did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Staged; the batch may grow.
    Staged,
    /// Staged, and the batch cannot grow: `finish` it now.
    Full,
    /// Not taken: it does not continue the batch. `finish` the batch, then push the frame again.
    Flush,
    /// Not taken, and the batch is empty: a batch of this frame alone (a PSH segment) would
    /// only be a copy, so write it alone behind `vnet::ZERO`.
    Alone,
}

/// The bookkeeping of the batch staged in the caller's buffer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coalescer {
    /// Segments staged; 0 when empty.
    count: usize,
    /// Bytes of super-frame staged (after the vnet header).
    len: usize,
    /// May the batch grow?
    open: bool,
    v6: bool,
    hdr_len: usize,
    gso_size: usize,
    next_seq: u32,
    first_id: u16,
}

impl Coalescer {
    pub const fn new() -> Coalescer {
        Coalescer { count: 0, len: 0, open: false, v6: false, hdr_len: 0, gso_size: 0, next_seq: 0, first_id: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Segments staged.
    pub fn segments(&self) -> usize {
        self.count
    }

    /// Offer `frame`, which `seg` was parsed from. `stage` is the same buffer on every call
    /// until `finish`. Panics if `frame` is not `seg`'s frame (its length differs).
    pub fn push(&mut self, stage: &mut [u8], frame: &[u8], seg: &Candidate) -> Push {
        assert_eq!(frame.len(), seg.len, "not the candidate's frame");
        if self.count == 0 {
            if seg.psh || VnetHdr::LEN + frame.len() > stage.len() {
                return Push::Alone;
            }
            stage[VnetHdr::LEN..VnetHdr::LEN + frame.len()].copy_from_slice(frame);
            let id = if seg.v6 { 0 } else { be16(frame, ETH_LEN + 4) };
            *self = Coalescer {
                count: 1,
                len: frame.len(),
                open: true,
                v6: seg.v6,
                hdr_len: seg.hdr_len,
                gso_size: seg.payload_len(),
                next_seq: seg.seq.wrapping_add(seg.payload_len() as u32),
                first_id: id,
            };
            self.close_if_full(stage.len());
            return if self.open { Push::Staged } else { Push::Full };
        }
        if !self.open || !self.continues(stage, frame, seg) {
            return Push::Flush;
        }
        let (at, plen) = (VnetHdr::LEN + self.len, seg.payload_len());
        stage[at..at + plen].copy_from_slice(&frame[seg.hdr_len..]);
        let l4 = VnetHdr::LEN + seg.l4();
        self.len += plen;
        self.count += 1;
        self.next_seq = self.next_seq.wrapping_add(plen as u32);
        if seg.psh {
            stage[l4 + headers::TCP_FLAGS] |= TCP_PSH;
            self.open = false;
        }
        if plen < self.gso_size {
            self.open = false;
        }
        self.close_if_full(stage.len());
        if self.open {
            Push::Staged
        } else {
            Push::Full
        }
    }

    /// Close the batch if no further segment could join it (`continues` checks the room a
    /// shorter one needs).
    fn close_if_full(&mut self, stage_len: usize) {
        if self.count >= MAX_SEGMENTS
            || self.len - ETH_LEN >= headers::MAX_IP_LEN
            || VnetHdr::LEN + self.len >= stage_len
        {
            self.open = false;
        }
    }

    fn continues(&self, stage: &[u8], frame: &[u8], seg: &Candidate) -> bool {
        let plen = seg.payload_len();
        if seg.v6 != self.v6 || seg.hdr_len != self.hdr_len || plen > self.gso_size || seg.seq != self.next_seq {
            return false;
        }
        if self.len + plen - ETH_LEN > headers::MAX_IP_LEN || VnetHdr::LEN + self.len + plen > stage.len() {
            return false;
        }
        let s = &stage[VnetHdr::LEN..VnetHdr::LEN + self.hdr_len];
        let f = &frame[..self.hdr_len];
        let same = |a: usize, b: usize| s[a..b] == f[a..b];
        let ip_same = if self.v6 {
            // version, traffic class, flow label; next header, hop limit; addresses
            same(ETH_LEN, ETH_LEN + 4) && same(ETH_LEN + 6, ETH_LEN + 40)
        } else {
            // TOS; flags (DF) and fragment offset, TTL, protocol; addresses
            let id = self.first_id.wrapping_add(self.count as u16);
            same(ETH_LEN + 1, ETH_LEN + 2)
                && be16(f, ETH_LEN + 4) == id
                && same(ETH_LEN + 6, ETH_LEN + 10)
                && same(ETH_LEN + 12, ETH_LEN + 20)
        };
        let l4 = seg.l4();
        // ports; ack, data offset and reserved bits; window (as Linux GRO: the segments then come
        // back from the kernel as they were sent); urgent pointer and options
        let w = l4 + headers::TCP_WINDOW;
        same(0, ETH_LEN)
            && ip_same
            && same(l4, l4 + 4)
            && same(l4 + 8, l4 + 13)
            && same(w, w + 2)
            && same(l4 + 18, self.hdr_len)
    }

    /// Close the batch: write the vnet header, fix the headers of a super-frame, and return `n`
    /// so that `stage[..n]` is what to write to the TAP (0 if nothing was staged). Resets to empty.
    pub fn finish(&mut self, stage: &mut [u8]) -> usize {
        if self.count == 0 {
            return 0;
        }
        let n = VnetHdr::LEN + self.len;
        if self.count == 1 {
            stage[..VnetHdr::LEN].copy_from_slice(&ZERO);
        } else {
            let l4 = ETH_LEN + if self.v6 { headers::IPV6_LEN } else { IPV4_MIN };
            let f = &mut stage[VnetHdr::LEN..n];
            if self.v6 {
                put16(f, ETH_LEN + 4, (self.len - l4) as u16);
            } else {
                put16(f, ETH_LEN + 2, (self.len - ETH_LEN) as u16);
                headers::set_ipv4_checksum(f, l4);
            }
            let partial = checksum::fold(headers::pseudo(f, self.v6, PROTO_TCP, self.len - l4));
            put16(f, l4 + headers::TCP_CSUM, partial);
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if self.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: self.hdr_len as u16,
                gso_size: self.gso_size as u16,
                csum_start: l4 as u16,
                csum_offset: headers::TCP_CSUM as u16,
            }
            .write(stage);
        }
        *self = Coalescer::new();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::segment::{self, complete_checksum};
    use crate::offload::testkit::{self, fixed_flow, read, ref_fold, Csum, Flow, L4};
    use crate::offload::vnet::GSO_NONE;
    use proptest::prelude::*;

    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;

    fn payload(n: usize, salt: u32) -> Vec<u8> {
        (0..n).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(salt) as u8).collect()
    }

    /// The event loop's use of the coalescer (as in the module comment): each write to the TAP.
    fn run(frames: &[Vec<u8>], stage_len: usize) -> Vec<Vec<u8>> {
        let mut stage = vec![0u8; stage_len];
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        let flush = |c: &mut Coalescer, stage: &mut [u8], out: &mut Vec<Vec<u8>>| {
            if !c.is_empty() {
                let n = c.finish(stage);
                assert!(c.is_empty());
                out.push(stage[..n].to_vec());
            }
        };
        let alone = |out: &mut Vec<Vec<u8>>, f: &[u8]| out.push([&ZERO[..], f].concat());
        for f in frames {
            match Candidate::parse(f) {
                None => {
                    flush(&mut c, &mut stage, &mut out);
                    alone(&mut out, f);
                }
                Some(seg) => {
                    for attempt in 0.. {
                        assert!(attempt < 2, "pushed twice after a flush");
                        match c.push(&mut stage, f, &seg) {
                            Push::Staged => break,
                            Push::Full => {
                                flush(&mut c, &mut stage, &mut out);
                                break;
                            }
                            Push::Flush => flush(&mut c, &mut stage, &mut out),
                            Push::Alone => {
                                alone(&mut out, f);
                                break;
                            }
                        }
                    }
                }
            }
        }
        flush(&mut c, &mut stage, &mut out);
        out
    }

    /// What the kernel makes of each write, checked the way it checks: a GSO header is
    /// consistent and its checksum completes to a valid one; segmented back into frames.
    fn unsegment(writes: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for w in writes {
            let hdr = VnetHdr::parse(w).unwrap();
            let frame = &w[VnetHdr::LEN..];
            if hdr.is_gso() {
                assert_eq!(hdr.flags, F_NEEDS_CSUM);
                assert!(hdr.hdr_len >= hdr.csum_start + hdr.csum_offset + 2);
                assert!(frame.len() - usize::from(hdr.hdr_len) > usize::from(hdr.gso_size), "more than one segment");
                let mut whole = frame.to_vec();
                complete_checksum(&VnetHdr { gso_type: GSO_NONE, ..hdr }, &mut whole).unwrap();
                read(&whole); // the super-frame with its checksum completed is a valid packet
            } else {
                assert_eq!(hdr, VnetHdr::default());
            }
            let p = segment::plan(&hdr, frame).unwrap();
            assert!(p.count() >= 2 || p.is_passthrough());
            for i in 0..p.count() {
                let mut out = vec![0u8; p.seg_len(i)];
                p.write(frame, i, &mut out);
                frames.push(out);
            }
        }
        frames
    }

    /// Where two lists of frames first differ, briefly (proptest would print them whole).
    fn diff(got: &[Vec<u8>], want: &[Vec<u8>]) -> Option<String> {
        if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
            let at = (0..).find(|&j| got[i].get(j) != want[i].get(j)).unwrap();
            let lo = at.saturating_sub(8);
            let show =
                |f: &[u8]| format!("len {} bytes {}..: {:?}", f.len(), lo, &f[lo.min(f.len())..(at + 8).min(f.len())]);
            return Some(format!("frame {i} differs at byte {at}: got {} want {}", show(&got[i]), show(&want[i])));
        }
        (got.len() != want.len()).then(|| format!("{} frames, want {}", got.len(), want.len()))
    }

    fn seg(flow: &Flow, seq: u32, flags: u8, id: u16, data: &[u8]) -> Vec<u8> {
        flow.frame(L4::Tcp { seq, flags }, id, data, Csum::Full)
    }

    /// `n` back-to-back full segments of `len` bytes.
    fn train(flow: &Flow, n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| seg(flow, 1000 + (i * len) as u32, ACK, 7 + i as u16, &payload(len, i as u32))).collect()
    }

    #[test]
    fn one_segment_goes_out_unchanged() {
        for v6 in [false, true] {
            let f = train(&fixed_flow(v6), 1, 1448).remove(0);
            let writes = run(std::slice::from_ref(&f), STAGE_LEN);
            assert_eq!(writes, vec![[&ZERO[..], &f].concat()]);
        }
        let mut stage = vec![0u8; STAGE_LEN];
        assert_eq!(Coalescer::new().finish(&mut stage), 0);
    }

    #[test]
    fn segments_become_one_gso_frame() {
        for v6 in [false, true] {
            let flow = fixed_flow(v6);
            // The MSS of an MTU of 1500 with timestamps: 1448 (IPv4), 1428 (IPv6).
            let mss = MAX_FRAME - (14 + flow.ip_hdr_len() + 32);
            let mut frames = train(&flow, 3, mss);
            frames.push(seg(&flow, 1000 + 3 * mss as u32, ACK | PSH, 10, &payload(500, 3)));
            let writes = run(&frames, STAGE_LEN);
            assert_eq!(writes.len(), 1);
            let w = &writes[0];
            let hdr = VnetHdr::parse(w).unwrap();
            let l4 = 14 + flow.ip_hdr_len();
            let hdr_len = l4 + 32;
            assert_eq!(
                hdr,
                VnetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                    hdr_len: hdr_len as u16,
                    gso_size: mss as u16,
                    csum_start: l4 as u16,
                    csum_offset: 16,
                }
            );
            let sup = &w[VnetHdr::LEN..];
            assert_eq!(sup.len(), hdr_len + 3 * mss + 500);
            // The super-frame as the kernel would have made it: first segment's headers, PSH of
            // the last, whole length, pseudo-header sum in the checksum field.
            let data: Vec<u8> = frames.iter().flat_map(|f| f[hdr_len..].to_vec()).collect();
            let want = flow.frame(L4::Tcp { seq: 1000, flags: ACK | PSH }, 7, &data, Csum::Partial);
            assert_eq!(sup, &want[..]);
            let l4_len = sup.len() - l4;
            assert_eq!(be16(sup, l4 + 16), ref_fold(flow.pseudo_sum(6, l4_len)));
            assert_eq!(unsegment(&writes), frames);
        }
    }

    #[test]
    fn never_coalesced() {
        let flow = fixed_flow(false);
        let f6 = fixed_flow(true);
        let good = seg(&flow, 1, ACK, 1, &payload(100, 1));
        assert!(Candidate::parse(&good).is_some());
        let edit = |base: &[u8], e: &dyn Fn(&mut Vec<u8>)| {
            let mut f = base.to_vec();
            e(&mut f);
            f
        };
        let refix_ip = |f: &mut Vec<u8>| {
            f[24..26].fill(0);
            let c = !ref_fold(testkit::ref_sum(&f[14..34]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        };
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("arp", testkit::arp()),
            ("dhcp", testkit::dhcp()),
            ("icmp", testkit::icmp()),
            ("udp", flow.frame(L4::Udp, 1, &payload(100, 1), Csum::Full)),
            ("udp6", f6.frame(L4::Udp, 1, &payload(100, 1), Csum::Full)),
            ("empty ack", seg(&flow, 1, ACK, 1, &[])),
            ("empty ack6", seg(&f6, 1, ACK, 1, &[])),
            ("bad tcp checksum", edit(&good, &|f| f[100] ^= 0x40)),
            ("bad ip checksum", edit(&good, &|f| f[24] ^= 1)),
            ("bad tcp6 checksum", edit(&seg(&f6, 1, ACK, 1, &payload(100, 1)), &|f| f[54 + 16] ^= 1)),
            ("ip options", seg(&Flow { ip_opts: vec![1, 1, 1, 0], ..flow.clone() }, 1, ACK, 1, &payload(100, 1))),
            (
                "fragment MF",
                edit(&good, &|f| {
                    f[20] |= 0x20;
                    refix_ip(f)
                }),
            ),
            (
                "fragment offset",
                edit(&good, &|f| {
                    f[21] = 8;
                    refix_ip(f)
                }),
            ),
            ("padding", edit(&seg(&flow, 1, ACK, 1, &[7]), &|f| f.resize(60, 0))),
            ("truncated", edit(&good, &|f| f.truncate(f.len() - 1))),
            (
                "vlan",
                edit(&good, &|f| {
                    f.splice(12..12, [0x81, 0, 0, 5]);
                }),
            ),
            ("ipv6 extension header", edit(&seg(&f6, 1, ACK, 1, &payload(100, 1)), &|f| f[20] = 0)),
            ("tcp data offset 4", edit(&good, &|f| f[34 + 12] = 0x40)),
            (
                "not ipv4",
                edit(&good, &|f| {
                    f[14] = 0x55;
                    refix_ip(f)
                }),
            ),
            ("short", good[..40].to_vec()),
        ];
        for flags in [0x02, 0x12, 0x01, 0x11, 0x04, 0x14, 0x30, 0x50, 0x90, 0x00, 0x08, 0x19, 0x18 | 0x40] {
            cases.push(("flags", seg(&flow, 1, flags, 1, &payload(100, 1))));
            cases.push(("flags6", seg(&f6, 1, flags, 1, &payload(100, 1))));
        }
        for (why, f) in cases {
            assert_eq!(Candidate::parse(&f), None, "{why}");
            // Amid a train, it splits it and passes unchanged.
            let mut frames = train(&flow, 2, 100);
            frames.insert(1, f.clone());
            assert_eq!(
                run(&frames, STAGE_LEN),
                frames.iter().map(|x| [&ZERO[..], x].concat()).collect::<Vec<_>>(),
                "{why}"
            );
        }
    }

    /// Each difference a segment may not have from the batch makes `push` say Flush; the
    /// segment then starts a batch of its own.
    #[test]
    fn what_breaks_a_batch() {
        for v6 in [false, true] {
            let flow = fixed_flow(v6);
            let next = |f: &Flow, seq: u32, id: u16, n: usize| seg(f, 1000 + seq, ACK, id, &payload(n, 2));
            let mut cases: Vec<(&str, Vec<u8>)> = vec![
                ("dst mac", next(&Flow { dst_mac: [2, 0, 0, 0, 0, 9], ..flow.clone() }, 1000, 8, 1000)),
                ("src mac", next(&Flow { src_mac: [2, 0, 0, 0, 0, 9], ..flow.clone() }, 1000, 8, 1000)),
                ("src ip", next(&Flow { src: [9; 16], ..flow.clone() }, 1000, 8, 1000)),
                ("dst ip", next(&Flow { dst: [9; 16], ..flow.clone() }, 1000, 8, 1000)),
                ("tos", next(&Flow { tos: 1, ..flow.clone() }, 1000, 8, 1000)),
                ("ttl", next(&Flow { ttl: 63, ..flow.clone() }, 1000, 8, 1000)),
                ("sport", next(&Flow { sport: 1, ..flow.clone() }, 1000, 8, 1000)),
                ("dport", next(&Flow { dport: 1, ..flow.clone() }, 1000, 8, 1000)),
                ("ack", next(&Flow { ack: 1001, ..flow.clone() }, 1000, 8, 1000)),
                (
                    "options",
                    next(&Flow { tcp_opts: vec![1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 2], ..flow.clone() }, 1000, 8, 1000),
                ),
                ("option length", next(&Flow { tcp_opts: vec![], ..flow.clone() }, 1000, 8, 1000)),
                ("window", next(&Flow { window: 1, ..flow.clone() }, 1000, 8, 1000)),
                ("seq gap", next(&flow, 1001, 8, 1000)),
                ("seq repeat", next(&flow, 0, 8, 1000)),
                ("longer", next(&flow, 1000, 8, 1001)),
            ];
            if v6 {
                cases.push(("flow label", next(&Flow { flow_label: 1, ..flow.clone() }, 1000, 8, 1000)));
                cases.push(("other family", next(&fixed_flow(false), 1000, 8, 1000)));
            } else {
                cases.push(("df", next(&Flow { df: false, ..flow.clone() }, 1000, 8, 1000)));
                cases.push(("id gap", next(&flow, 1000, 9, 1000)));
                cases.push(("id repeat", next(&flow, 1000, 7, 1000)));
                cases.push(("other family", next(&fixed_flow(true), 1000, 8, 1000)));
            }
            let first = next(&flow, 0, 7, 1000);
            for (why, f) in cases {
                let mut stage = vec![0u8; STAGE_LEN];
                let mut c = Coalescer::new();
                assert_eq!(c.push(&mut stage, &first, &Candidate::parse(&first).unwrap()), Push::Staged);
                let cand = Candidate::parse(&f).unwrap_or_else(|| panic!("{why}: a candidate"));
                assert_eq!(c.push(&mut stage, &f, &cand), Push::Flush, "{why}");
                assert_eq!(c.segments(), 1);
                assert_eq!(run(&[first.clone(), f.clone()], STAGE_LEN).len(), 2, "{why}");
            }
            // Allowed to differ: PSH or a shorter payload, which close.
            for (f, want) in [
                (seg(&flow, 2000, ACK | PSH, 8, &payload(1000, 2)), Push::Full),
                (next(&flow, 1000, 8, 999), Push::Full),
            ] {
                let mut stage = vec![0u8; STAGE_LEN];
                let mut c = Coalescer::new();
                c.push(&mut stage, &first, &Candidate::parse(&first).unwrap());
                assert_eq!(c.push(&mut stage, &f, &Candidate::parse(&f).unwrap()), want);
                assert_eq!(c.segments(), 2);
                if want == Push::Full {
                    let more = next(&flow, 2000, 9, 1000);
                    assert_eq!(c.push(&mut stage, &more, &Candidate::parse(&more).unwrap()), Push::Flush);
                }
                assert_eq!(unsegment(&run(&[first.clone(), f.clone()], STAGE_LEN)).len(), 2);
            }
        }
    }

    #[test]
    fn a_psh_segment_alone_is_not_staged() {
        let flow = fixed_flow(false);
        let f = seg(&flow, 1, ACK | PSH, 1, b"ls\n");
        let mut stage = vec![0u8; STAGE_LEN];
        let mut c = Coalescer::new();
        assert_eq!(c.push(&mut stage, &f, &Candidate::parse(&f).unwrap()), Push::Alone);
        assert!(c.is_empty());
    }

    #[test]
    fn batch_limits() {
        let flow = fixed_flow(false);
        // At most MAX_SEGMENTS segments.
        let frames = train(&flow, MAX_SEGMENTS + 1, 100);
        let writes = run(&frames, STAGE_LEN);
        assert_eq!(writes.len(), 2);
        assert_eq!(VnetHdr::parse(&writes[0]).unwrap().gso_type, GSO_TCPV4);
        assert_eq!(writes[0].len(), VnetHdr::LEN + 66 + MAX_SEGMENTS * 100);
        assert_eq!(unsegment(&writes), frames);
        // At most 65535 bytes of IP packet: 52 + 45 * 1448 fits, a 46th segment does not.
        let frames = train(&flow, 47, 1448);
        let writes = run(&frames, STAGE_LEN);
        assert_eq!(
            writes.iter().map(|w| w.len()).collect::<Vec<_>>(),
            [VnetHdr::LEN + 66 + 45 * 1448, VnetHdr::LEN + 66 + 2 * 1448]
        );
        assert_eq!(unsegment(&writes), frames);
        // A batch that reaches exactly 65535 bytes is full: 65535 - 52 = 63 * 1039 + 26.
        let mut frames = train(&flow, 63, 1039);
        frames.push(seg(&flow, 1000 + 63 * 1039, ACK, 7 + 63, &payload(26, 5)));
        let mut stage = vec![0u8; STAGE_LEN];
        let mut c = Coalescer::new();
        let pushes: Vec<Push> = frames.iter().map(|f| c.push(&mut stage, f, &Candidate::parse(f).unwrap())).collect();
        assert_eq!(pushes[62], Push::Staged);
        assert_eq!(pushes[63], Push::Full);
        assert_eq!(c.finish(&mut stage), STAGE_LEN);
        // A smaller stage holds less, and a frame that does not fit at all goes alone.
        let frames = train(&flow, 5, 1000);
        let small = VnetHdr::LEN + 2 * 1066 + 1000;
        let writes = run(&frames, small);
        assert_eq!(writes.len(), 2);
        assert!(writes.iter().all(|w| w.len() <= small));
        assert_eq!(unsegment(&writes), frames);
        assert_eq!(run(&frames[..1], 1000), vec![[&ZERO[..], &frames[0]].concat()]);
    }

    /// A frame longer than the TAP's MTU allows is never merged: alone, the bridge drops it
    /// before another port; in a super-frame it would pass, cut to its length.
    #[test]
    fn frames_over_the_mtu_go_alone() {
        for v6 in [false, true] {
            let flow = fixed_flow(v6);
            let fits = MAX_FRAME - (ETH_LEN + flow.ip_hdr_len() + 20 + flow.tcp_opts.len());
            let frames = train(&flow, 3, fits);
            assert_eq!(frames[0].len(), MAX_FRAME);
            assert_eq!(run(&frames, STAGE_LEN).len(), 1, "v6 {v6}: up to the MTU they merge");
            let frames = train(&flow, 3, fits + 1);
            assert!(Candidate::parse(&frames[0]).is_none());
            let writes = run(&frames, STAGE_LEN);
            assert_eq!(writes, frames.iter().map(|f| [&ZERO[..], f].concat()).collect::<Vec<_>>(), "v6 {v6}");
            let jumbo = train(&flow, 2, 8960);
            assert_eq!(run(&jumbo, STAGE_LEN).len(), 2);
        }
    }

    /// A run of segments of one flow with events that break batches, and other frames amid it.
    fn stream() -> impl Strategy<Value = Vec<Vec<u8>>> {
        (
            any::<bool>().prop_flat_map(testkit::plain_flow),
            any::<bool>().prop_flat_map(testkit::plain_flow),
            any::<u32>(),
            any::<u16>(),
            1usize..1500,
            proptest::collection::vec((0u8..24, any::<u16>()), 1..150),
        )
            .prop_map(|(flow, other, mut seq, mut id, mss, events)| {
                let mut flow = flow;
                let mut frames = Vec::new();
                for (k, (e, x)) in events.into_iter().enumerate() {
                    let mut len = mss;
                    let mut flags = ACK;
                    match e {
                        14 => len = 1 + usize::from(x) % mss,
                        15 => flags |= PSH,
                        16 => flow.window = x,
                        17 => seq = seq.wrapping_add(1 + u32::from(x)),
                        18 => flow.ack = flow.ack.wrapping_add(u32::from(x)),
                        19 => id = id.wrapping_add(x | 1),
                        20 => {
                            frames.push([testkit::arp(), testkit::dhcp(), testkit::icmp()][usize::from(x) % 3].clone());
                            continue;
                        }
                        21 => {
                            frames.push(seg(&other, u32::from(x), ACK, x, &payload(mss, k as u32)));
                            continue;
                        }
                        _ => {}
                    }
                    let mut f = seg(&flow, seq, flags, id, &payload(len, k as u32));
                    if e == 22 {
                        let at = usize::from(x) % f.len();
                        f[at] ^= 0x10; // corrupted somewhere
                    }
                    if e == 23 {
                        flags = [0x02, 0x11, 0x04, 0x18 | 0x80][usize::from(x) % 4];
                        f = seg(&flow, seq, flags, id, &payload(len, k as u32));
                    }
                    frames.push(f);
                    seq = seq.wrapping_add(len as u32);
                    id = id.wrapping_add(1);
                }
                frames
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Coalesced and segmented again, any stream comes back byte for byte, and every write is
        /// one the kernel accepts (checked in `unsegment`).
        #[test]
        fn coalesce_then_segment_is_identity(frames in stream()) {
            let writes = run(&frames, STAGE_LEN);
            prop_assert!(writes.len() <= frames.len());
            prop_assert_eq!(diff(&unsegment(&writes), &frames), None);
        }

        /// An unbroken train of k segments of one flow becomes ceil(k / 64) writes.
        #[test]
        fn trains_coalesce(flow in any::<bool>().prop_flat_map(testkit::plain_flow), k in 1usize..200, mss in 1usize..1460) {
            let frames = train(&flow, k, mss);
            let writes = run(&frames, STAGE_LEN);
            let per_batch = match frames[0].len() > MAX_FRAME {
                true => 1,
                false => MAX_SEGMENTS.min((65535 - (flow.ip_hdr_len() + 20 + flow.tcp_opts.len())) / mss),
            };
            prop_assert_eq!(writes.len(), k.div_ceil(per_batch));
            prop_assert_eq!(diff(&unsegment(&writes), &frames), None);
        }

        /// Arbitrary bytes, and valid segments with bytes flipped, never panic and still come
        /// back unchanged.
        #[test]
        fn arbitrary_frames(frames in stream(), junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..5), flips in proptest::collection::vec((any::<usize>(), any::<usize>(), any::<u8>()), 0..6)) {
            let mut frames = frames;
            for (i, at, x) in flips {
                let i = i % frames.len();
                let at = at % frames[i].len();
                frames[i][at] ^= x;
            }
            for j in &junk {
                let _ = Candidate::parse(j);
            }
            let writes = run(&frames, STAGE_LEN);
            // Flipped bytes may leave a frame that segmentation would refuse, but such a frame
            // was never coalesced, so it went out as is.
            let mut back = Vec::new();
            for w in &writes {
                if VnetHdr::parse(w).unwrap().is_gso() {
                    back.extend(unsegment(std::slice::from_ref(w)));
                } else {
                    back.push(w[VnetHdr::LEN..].to_vec());
                }
            }
            prop_assert_eq!(diff(&back, &frames), None);
        }
    }
}
