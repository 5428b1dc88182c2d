//! `cargo +nightly fuzz run tokenizer`: see bayeslora::fuzz::tokenizer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::tokenizer(data);
});
