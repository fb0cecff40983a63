//! libFuzzer driver of [`fuzz_targets::migration_stream`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::migration_stream(data));
