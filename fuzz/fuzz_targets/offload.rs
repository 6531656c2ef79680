//! Fuzzes the offload core. Input: a 10-byte vnet header and a frame from the TAP, which must
//! never panic `segment::plan`/`write` or `complete_checksum`, and whose planned lengths must
//! add up; then the same bytes cut into frames (a length byte before each) pushed through the
//! coalescer as the event loop does, whose every write must plan again into as many frames as
//! it took in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsnic::offload::coalesce::{Candidate, Coalescer, Push, STAGE_LEN};
use wsnic::offload::segment::{complete_checksum, plan};
use wsnic::offload::vnet::VnetHdr;

fn check_write(w: &[u8], took: usize) {
    let hdr = VnetHdr::parse(w).expect("a header");
    let p = plan(&hdr, &w[VnetHdr::LEN..]).expect("our own writes plan");
    assert_eq!(p.count(), took);
}

fuzz_target!(|data: &[u8]| {
    let Some(hdr) = VnetHdr::parse(data) else { return };
    let frame = &data[VnetHdr::LEN..];
    if let Ok(p) = plan(&hdr, frame) {
        let mut out = vec![0u8; 65536 + 128];
        let mut total = 0;
        for i in 0..p.count() {
            total += p.write(frame, i, &mut out);
        }
        assert_eq!(total, p.total_len());
    }
    let mut copy = frame.to_vec();
    let _ = complete_checksum(&hdr, &mut copy);

    let mut stage = vec![0u8; STAGE_LEN];
    let mut c = Coalescer::new();
    let mut rest = data;
    while let [n, tail @ ..] = rest {
        let n = (usize::from(*n) * 8).min(tail.len());
        let (f, tail) = tail.split_at(n);
        rest = tail;
        let Some(seg) = Candidate::parse(f) else {
            if !c.is_empty() {
                let k = c.segments();
                let len = c.finish(&mut stage);
                check_write(&stage[..len], k);
            }
            continue;
        };
        loop {
            let k = c.segments();
            match c.push(&mut stage, f, &seg) {
                Push::Staged => break,
                Push::Alone => break,
                Push::Full | Push::Flush => {
                    let full = c.segments() > k;
                    let k = c.segments();
                    let len = c.finish(&mut stage);
                    check_write(&stage[..len], k);
                    if full {
                        break;
                    }
                }
            }
        }
    }
    if !c.is_empty() {
        let k = c.segments();
        let len = c.finish(&mut stage);
        check_write(&stage[..len], k);
    }
});
