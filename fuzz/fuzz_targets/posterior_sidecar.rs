//! `cargo +nightly fuzz run posterior_sidecar`: see bayeslora::fuzz::posterior_sidecar.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::posterior_sidecar(data);
});
