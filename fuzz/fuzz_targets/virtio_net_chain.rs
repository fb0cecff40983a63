//! libFuzzer driver of [`fuzz_targets::virtio_net_chain`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::virtio_net_chain(data));
