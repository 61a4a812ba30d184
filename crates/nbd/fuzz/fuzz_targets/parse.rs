//! Fuzzes the NBD parsers with arbitrary client bytes: option and request headers, GO/INFO
//! and meta-context payloads. Run with `cargo fuzz run parse` in crates/nbd/fuzz.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = parse_info_request(data);
    let _ = parse_meta_request(data);
    if data.len() >= REQUEST_LEN {
        let mut b = [0u8; REQUEST_LEN];
        b.copy_from_slice(&data[..REQUEST_LEN]);
        if let Ok(r) = parse_request(&b) {
            assert_eq!(encode_request(&r), b);
        }
    }
    if data.len() >= 20 {
        let mut b = [0u8; 20];
        b.copy_from_slice(&data[..20]);
        let _ = parse_option_reply_header(&b);
    }
});
