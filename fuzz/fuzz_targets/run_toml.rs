//! `cargo +nightly fuzz run run_toml`: the library sections of a run's TOML (`[train]`, `[lora]`,
//! `[blora]`) parsed and validated as `bayeslora train --config` does. The CLI's own file
//! (crates/cli/src/config.rs) is replayed on this corpus by its unit test.
#![no_main]
use bayeslora::adapters::blora::BLoraConfig;
use bayeslora::adapters::lora::LoraConfig;
use bayeslora::train::TrainConfig;

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Sections {
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    lora: LoraConfig,
    #[serde(default)]
    blora: BLoraConfig,
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(s) = toml::from_str::<Sections>(text) {
            let _ = s.train.validate();
        }
    }
});
