//! libFuzzer driver of [`fuzz_targets::ipc_messages`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::ipc_messages(data));
