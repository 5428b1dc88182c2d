//! `cargo +nightly fuzz run safetensors`: see bayeslora::fuzz::safetensors.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::safetensors(data);
});
