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
//! expects of CHECKSUM_PARTIAL), PSH and the window of the last segment.
//!
//! A candidate is IPv4 (IHL 5, not a fragment, valid header checksum) or IPv6 (next header
//! TCP), exactly as long as its IP length says (no Ethernet padding), TCP with flags ACK or
//! ACK|PSH, payload, and a valid TCP checksum: the client is untrusted, and a corrupt segment
//! must reach the peer corrupt rather than "repaired" by the checksum we would compute for it.
//! It continues a batch when everything but the sequence number, IPv4 identification, window,
//! PSH and checksums is identical to the staged first segment (Ethernet header, addresses,
//! TOS/traffic class and flow label, TTL/hop limit, DF, ports, ack, data offset, urgent
//! pointer, option bytes), the sequence number and IPv4 identification follow on, and its
//! payload is at most `gso_size`; a PSH or shorter segment ends the batch, as do
//! `MAX_SEGMENTS` segments or an IP length that would pass 65535.

use super::headers::{self, be16, put16, ETH_LEN, IPV4_MIN, PROTO_TCP, TCP_ACK, TCP_PSH};
use super::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, ZERO};
use crate::wire::checksum;

/// Most segments in one batch.
pub const MAX_SEGMENTS: usize = 64;
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
        stage[l4 + headers::TCP_WINDOW..l4 + headers::TCP_WINDOW + 2]
            .copy_from_slice(&frame[seg.l4() + headers::TCP_WINDOW..seg.l4() + headers::TCP_WINDOW + 2]);
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
        // ports; ack, data offset and reserved bits; urgent pointer and options
        same(0, ETH_LEN) && ip_same && same(l4, l4 + 4) && same(l4 + 8, l4 + 13) && same(l4 + 18, self.hdr_len)
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

/// Write `frame` behind a zero vnet header into `stage` and return the length to write: for a
/// caller without `writev`. Only while the coalescer is empty (it overwrites the stage).
pub fn stage_alone(stage: &mut [u8], frame: &[u8]) -> usize {
    stage[..VnetHdr::LEN].copy_from_slice(&ZERO);
    stage[VnetHdr::LEN..VnetHdr::LEN + frame.len()].copy_from_slice(frame);
    VnetHdr::LEN + frame.len()
}
