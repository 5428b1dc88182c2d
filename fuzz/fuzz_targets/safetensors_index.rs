//! `cargo +nightly fuzz run safetensors_index`: see bayeslora::fuzz::safetensors_index.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::safetensors_index(data);
});
