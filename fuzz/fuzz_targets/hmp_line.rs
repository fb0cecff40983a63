//! libFuzzer driver of [`fuzz_targets::hmp_line`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::hmp_line(data));
