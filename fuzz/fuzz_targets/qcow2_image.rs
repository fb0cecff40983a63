//! libFuzzer driver of [`fuzz_targets::qcow2_image`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qcow2_image(data));
