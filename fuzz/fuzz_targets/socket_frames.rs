//! libFuzzer driver of [`fuzz_targets::socket_frames`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::socket_frames(data));
