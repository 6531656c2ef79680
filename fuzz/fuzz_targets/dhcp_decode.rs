//! Fuzzes the DHCP decoder: arbitrary bytes never panic, and whatever decodes re-encodes to a
//! message that decodes to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsnic::dhcp::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = wire::decode(data) {
        let mut out = Vec::new();
        wire::encode(&msg, &mut out);
        assert_eq!(out.len(), wire::encoded_len(&msg));
        let again = wire::decode(&out).expect("an encoded message decodes");
        assert_eq!(again, msg);
    }
});
