//! libFuzzer driver of [`fuzz_targets::qmp_stream`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qmp_stream(data));
