//! libFuzzer driver of [`fuzz_targets::kernel_loader`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::kernel_loader(data));
