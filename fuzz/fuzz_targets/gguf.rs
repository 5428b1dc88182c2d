//! `cargo +nightly fuzz run gguf`: see bayeslora::fuzz::gguf.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::gguf(data);
});
