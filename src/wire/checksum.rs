//! The Internet checksum (RFC 1071): one's-complement sum of 16-bit words, summed 4 bytes at a
//! time (it is on the hot path of TAP offload: every segment, both directions).

/// Add `data` to a running sum (big-endian words; an odd last byte is padded with a zero).
///
/// The result is the one's-complement sum folded to at most `0xffff`, so callers may add a few
/// small terms (a protocol number, a length) to it before the next call; it is 0 only if `sum`
/// is 0 and `data` is all zeros, exactly like the plain 16-bit sum, so `finish` gives the same
/// checksum as a word-by-word sum would.
pub fn accumulate(sum: u32, data: &[u8]) -> u32 {
    // One's-complement addition commutes with byte-swapping (RFC 1071 §2.B), and 2^32 ≡ 1
    // (mod 2^16 - 1): add native-endian u32 words into a u64 (which the compiler vectorizes; no
    // overflow before 16 GiB), fold with end-around carry, and swap once at the end.
    let whole = data.len() / 4 * 4;
    let (words, rest) = data.split_at(whole);
    let native = fold64(sum_words(words));
    let mut total = u64::from(u16::from_be(native)) + u64::from(sum);
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        total += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [b] = pairs.remainder() {
        total += u64::from(*b) << 8;
    }
    u32::from(fold64(total))
}

/// Below this many bytes (headers, small frames) the portable loop is as fast as the AVX2 one
/// with its feature check: portable 2.4, 4.0 and 4.0 ns against AVX2 2.8, 3.9 and 3.3 ns for
/// 20, 96 and 128 bytes (a throwaway micro-benchmark on the benchmark machine, data in cache).
#[cfg(target_arch = "x86_64")]
const AVX2_FROM: usize = 128;

/// The sum of the native-endian u32 words of `words` (a multiple of 4 bytes long). With AVX2
/// (checked at run time; the build targets baseline x86-64, SSE2) the same loop takes half the
/// time: 22 against 43 ns for 1448 bytes in `cargo bench --bench offload` (data spread over
/// 4 MiB), 98 against 39 GB/s with the data in the first-level cache (the throwaway
/// micro-benchmark of `AVX2_FROM`); segments' payloads are summed at the rate the relay moves
/// them.
fn sum_words(words: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if words.len() >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { sum_words_avx2(words) };
    }
    sum_words_portable(words)
}

#[inline(always)]
fn sum_words_portable(words: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    for w in words.chunks_exact(4) {
        acc += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    acc
}

/// `sum_words_portable` compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2. (An `unsafe fn`: a safe one with `target_feature` needs Rust 1.86,
/// and the crate builds with 1.85.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u8]) -> u64 {
    sum_words_portable(words)
}

/// Fold a 64-bit one's-complement sum to 16 bits (end-around carry); 0 stays 0, nothing else
/// becomes 0.
fn fold64(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Fold a running sum into the final checksum.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Fold a running sum to 16 bits without complementing it: the form a CHECKSUM_PARTIAL header
/// field holds (the pseudo-header sum the device completes).
pub fn fold(sum: u32) -> u16 {
    !finish(sum)
}

pub fn checksum(data: &[u8]) -> u16 {
    finish(accumulate(0, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 done the slow, obvious way: 16-bit words into a wide sum, folded at the end.
    fn reference(sum: u64, data: &[u8]) -> u16 {
        let mut s = sum;
        for (i, b) in data.iter().enumerate() {
            s += if i % 2 == 0 { u64::from(*b) << 8 } else { u64::from(*b) };
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 0001 f203 f4f5 f6f7 is ddf2; the checksum its complement.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // Data that includes its own correct checksum sums to zero.
        let mut d = vec![0x45, 0x00, 0x00, 0x1c, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        let c = checksum(&d);
        d[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&d), 0);
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn zero_and_all_ones() {
        // +0 and -0 stay apart: all zeros sum to 0 (checksum ffff), all ones to ffff (checksum 0).
        assert_eq!(accumulate(0, &[0; 100]), 0);
        assert_eq!(checksum(&[0; 100]), 0xffff);
        assert_eq!(accumulate(0, &[0xff; 100]), 0xffff);
        assert_eq!(checksum(&[0xff; 100]), 0);
        assert_eq!(checksum(&[0xff; 65536 + 7]), reference(0, &[0xff; 65536 + 7]));
        assert_eq!(accumulate(u32::MAX, &[0xff; 40]), 0xffff);
        assert_eq!(fold(0x1_fffe), 0xffff);
    }

    proptest! {
        /// Same checksum as the reference for any data, length, starting offset (alignment) and
        /// initial sum; the running sum stays small enough to add a few terms to.
        #[test]
        fn matches_reference(data in proptest::collection::vec(any::<u8>(), 0..3000), skip in 0usize..8, sum: u32) {
            let d = &data[skip.min(data.len())..];
            let s = accumulate(sum, d);
            prop_assert!(s <= 0xffff);
            prop_assert_eq!(finish(s), reference(u64::from(sum), d));
            prop_assert_eq!(finish(s + 6 + 40), reference(u64::from(sum) + 46, d));
        }

        /// With AVX2 (when this CPU has it) the loop sums exactly what the portable one does.
        #[test]
        fn avx2_sums_as_the_portable_loop_does(data in proptest::collection::vec(any::<u8>(), 0..3000), skip in 0usize..8) {
            let d = &data[skip.min(data.len())..];
            let words = &d[..d.len() / 4 * 4];
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                prop_assert_eq!(unsafe { sum_words_avx2(words) }, sum_words_portable(words));
            }
            prop_assert_eq!(sum_words(words), sum_words_portable(words));
        }

        /// Chained calls over even-length pieces equal one call over the whole.
        #[test]
        fn chaining(a in proptest::collection::vec(any::<u8>(), 0..200), b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut a = a;
            if a.len() % 2 == 1 { a.pop(); }
            let whole: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
            prop_assert_eq!(finish(accumulate(accumulate(0, &a), &b)), checksum(&whole));
        }
    }
}
