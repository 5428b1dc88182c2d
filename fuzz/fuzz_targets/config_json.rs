//! `cargo +nightly fuzz run config_json`: see bayeslora::fuzz::config_json.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::config_json(data);
});
