//! libFuzzer driver of [`fuzz_targets::virtio_input`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::virtio_input(data));
