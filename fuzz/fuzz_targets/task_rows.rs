//! `cargo +nightly fuzz run task_rows`: see bayeslora::fuzz::task_rows.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bayeslora::fuzz::task_rows(data);
});
