//! The user-space half of TAP offload, without the kernel: how fast one core cuts a 64 KiB TCP
//! super-frame from the TAP into client frames (`offload::segment`), merges a client's segments
//! back into one for the TAP (`offload::coalesce`, every segment's checksums verified), and sums
//! a segment's payload (`wire::checksum`). No root, no namespaces:
//!
//! ```text
//! cargo bench --bench offload
//! ```
//!
//! Section b of the relay benchmark moves too much kernel work to show a change to these
//! (user space is ~15 % of the relay during a download with offload); this shows it.
//! Every figure is the median of 15 runs, each going through 64 copies of the data (4 MiB, more
//! than a core's L2 cache) so that the same bytes are not summed from the first-level cache
//! again and again.

use std::hint::black_box;
use std::time::Instant;
use wsnic::offload::coalesce::{Candidate, Coalescer, Push, STAGE_LEN};
use wsnic::offload::segment;
use wsnic::offload::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4};
use wsnic::wire::checksum;

const MSS: usize = 1448;
/// Ethernet + IPv4 + TCP with timestamps.
const HDR: usize = 14 + 20 + 32;
const COPIES: usize = 64;
const RUNS: usize = 15;

/// A TCPv4 super-frame as the kernel hands it over: `payload` bytes, CHECKSUM_PARTIAL (the
/// pseudo-header sum in the TCP checksum field), GSO to `MSS`.
fn super_frame(payload: usize) -> (VnetHdr, Vec<u8>) {
    let mut f = vec![0u8; HDR + payload];
    f[..12].copy_from_slice(&[2, 0, 0, 0, 0, 10, 2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((HDR - 14 + payload) as u16).to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64;
    f[23] = 6;
    f[26..34].copy_from_slice(&[198, 51, 100, 1, 192, 168, 2, 10]);
    f[34..38].copy_from_slice(&[0x14, 0x51, 0xc3, 0x50]);
    f[46] = 8 << 4;
    f[47] = 0x10; // ACK
    f[48..50].copy_from_slice(&[0x01, 0xf5]);
    f[54..56].copy_from_slice(&[1, 1]);
    f[56] = 8;
    f[57] = 10;
    for (i, b) in f[HDR..].iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let pseudo = checksum::accumulate(0, &f[26..34]) + 6 + (HDR - 34 + payload) as u32;
    f[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: HDR as u16,
        gso_size: MSS as u16,
        csum_start: 34,
        csum_offset: 16,
    };
    (hdr, f)
}

/// Median nanoseconds of `f(copy)` over `RUNS` runs, each through every copy `reps` times.
fn time<T>(copies: &mut [T], reps: usize, mut f: impl FnMut(&mut T)) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                for c in copies.iter_mut() {
                    f(c);
                }
            }
            t.elapsed().as_nanos() as f64 / (reps * copies.len()) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn main() {
    let (hdr, frame) = super_frame(65535 - (HDR - 14));
    let plan = segment::plan(&hdr, &frame).expect("a valid super-frame");
    let payload = frame.len() - HDR;
    println!("wsnic offload micro-benchmark (`cargo bench --bench offload`): one core, median of {RUNS} runs\n");
    println!("| case | median | per byte of payload |");
    println!("|---|---|---|");
    let row = |name: &str, ns: f64, bytes: usize| {
        println!("| {name} | {:.0} ns | {:.1} GB/s |", ns, bytes as f64 / ns);
    };

    // TAP → client: plan, then every segment behind 4 bytes of room (a WebSocket header) in a
    // 1 MiB output buffer, as the relay's pipe does.
    let mut frames: Vec<Vec<u8>> = (0..COPIES).map(|_| frame.clone()).collect();
    let mut out = vec![0u8; 1 << 20];
    let mut at = 0;
    let ns = time(&mut frames, 5, |f| {
        let p = segment::plan(&hdr, f).expect("planned");
        for i in 0..p.count() {
            if at + 4 + p.seg_len(i) > out.len() {
                at = 0;
            }
            at += 4 + p.write(f, i, &mut out[at + 4..]);
        }
        black_box(&out);
    });
    row(&format!("cut a 64 KiB TCPv4 super-frame into {} segments", plan.count()), ns, payload);

    // Client → TAP: the same segments, each parsed (IP and TCP checksums verified) and staged.
    let segments: Vec<Vec<u8>> = (0..plan.count())
        .map(|i| {
            let mut s = vec![0u8; plan.seg_len(i)];
            plan.write(&frame, i, &mut s);
            s
        })
        .collect();
    let mut batches: Vec<Vec<Vec<u8>>> = (0..COPIES).map(|_| segments.clone()).collect();
    let mut stage = vec![0u8; STAGE_LEN];
    let mut merged = 0;
    let ns = time(&mut batches, 5, |segs| {
        let mut gro = Coalescer::new();
        for s in segs.iter() {
            let c = Candidate::parse(s).expect("a segment that may be coalesced");
            match gro.push(&mut stage, s, &c) {
                Push::Staged => {}
                Push::Full => merged += gro.finish(&mut stage),
                p => panic!("{p:?}"),
            }
        }
        merged += gro.finish(&mut stage);
    });
    black_box(merged);
    row(&format!("merge {} segments (checksums verified) into one super-frame", segments.len()), ns, payload);

    // One segment's checksum.
    let mut payloads: Vec<Vec<u8>> =
        (0..COPIES * 40).map(|k| frame[HDR + k % 16..HDR + k % 16 + MSS].to_vec()).collect();
    let ns = time(&mut payloads, 20, |p| {
        black_box(checksum::accumulate(0, black_box(p)));
    });
    row(&format!("Internet checksum of {MSS} bytes"), ns, MSS);
}
