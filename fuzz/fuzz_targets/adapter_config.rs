//! `cargo +nightly fuzz run adapter_config`: see bayeslora::fuzz::adapter_config.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::adapter_config(data);
});
