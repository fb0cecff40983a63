//! libFuzzer driver of [`fuzz_targets::vhost_user_messages`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::vhost_user_messages(data));
