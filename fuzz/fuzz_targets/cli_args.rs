//! libFuzzer driver of [`fuzz_targets::cli_args`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::cli_args(data));
