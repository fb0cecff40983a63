//! libFuzzer driver of [`fuzz_targets::rfb_client`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::rfb_client(data));
