//! Bad-input tests of `models::load`: each error names the file (and tensor) at fault.
use std::path::{Path, PathBuf};

use bayeslora::models::{self, LoadOptions};
use bayeslora::{Error, Result};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert/tiny")
}

/// A temp copy of the tiny BERT folder, with `edit` applied to it.
fn copy_tiny(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).expect("copy fixture");
    }
    edit(dir.path());
    dir
}

fn load_err(dir: &Path) -> Error {
    match models::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            println!("{e}");
            e
        }
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(&path, v.to_string()).expect("write");
}

#[test]
fn the_fixture_itself_loads() -> Result<()> {
    let dir = copy_tiny(|_| {});
    let m = models::load(dir.path(), &LoadOptions::default())?;
    assert!(m.tokenizer.is_none());
    let msg = m.tokenizer().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("tokenizer.json"), "{msg}");
    Ok(())
}

#[test]
fn missing_safetensors_names_the_file() {
    let dir = copy_tiny(|d| std::fs::remove_file(d.join("model.safetensors")).expect("rm"));
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    assert!(msg.contains("model.safetensors") && msg.contains("not found"), "{msg}");
}

#[test]
fn truncated_safetensors_is_a_bad_file() {
    let dir = copy_tiny(|d| {
        let bytes = std::fs::read(d.join("model.safetensors")).expect("read");
        std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    });
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    assert!(msg.contains("model.safetensors") && msg.contains("re-download"), "{msg}");
}

#[test]
fn garbage_safetensors_is_a_bad_file() {
    let dir = copy_tiny(|d| {
        std::fs::write(d.join("model.safetensors"), b"this is not a safetensors file at all").expect("write")
    });
    let e = load_err(dir.path());
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    // A header that ends early, too.
    let dir = copy_tiny(|d| std::fs::write(d.join("model.safetensors"), [1u8, 0, 0]).expect("write"));
    assert!(matches!(load_err(dir.path()), Error::BadFile { .. }));
}

#[test]
fn wrong_hidden_size_is_a_shape_error_naming_file_and_tensor() {
    let dir = copy_tiny(|d| edit_config(d, |v| v["hidden_size"] = 64.into()));
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::TensorShape { .. }), "{e:?}");
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`bert.embeddings.word_embeddings.weight`")
            && msg.contains("[100, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let dir = copy_tiny(|_| {});
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    tensors.remove("bert.encoder.layer.1.output.dense.bias");
    candle_core::safetensors::save(&tensors, &path)?;
    let e = load_err(dir.path());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("`bert.encoder.layer.1.output.dense.bias`"), "{e}");
    Ok(())
}

#[test]
fn unknown_architecture_names_config_and_lists_supported() {
    let dir = copy_tiny(|d| edit_config(d, |v| v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])));
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e:?}");
    assert!(msg.contains("GPT2LMHeadModel") && msg.contains("config.json") && msg.contains("BertModel"), "{msg}");
}

#[test]
fn bad_config_json_names_the_file() {
    let dir = copy_tiny(|d| std::fs::write(d.join("config.json"), "{ not json").expect("write"));
    let e = load_err(dir.path());
    assert!(matches!(e, Error::BadFile { .. }) && e.to_string().contains("config.json"), "{e}");
    let dir = copy_tiny(|d| std::fs::remove_file(d.join("config.json")).expect("rm"));
    let e = load_err(dir.path());
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("config.json"), "{e}");
    let dir = copy_tiny(|d| edit_config(d, |v| v["hidden_act"] = "swish".into()));
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("config.json") && msg.contains("hidden_act"), "{msg}");
}

/// The memory check sizes a model folder from config.json and the safetensors headers alone
/// (`train::memory::ModelShape::read`): every tensor's parameters, the config's sizes, the
/// linears LoRA can target; a folder the loader refuses is refused here too.
#[test]
fn model_shape_from_config_and_headers() -> Result<()> {
    use bayeslora::train::memory::ModelShape;
    let shape = ModelShape::read(&tiny())?;
    let loaded = models::load(&tiny(), &LoadOptions::default())?;
    let w = &loaded.weights;
    let mut params = 0u64;
    for name in w.names() {
        params += w.shape_of(&name)?.iter().product::<usize>() as u64;
    }
    assert_eq!(shape.params, params);
    let cfg = &loaded.config_json;
    assert_eq!(shape.layers as u64, cfg["num_hidden_layers"].as_u64().unwrap());
    assert_eq!(shape.hidden as u64, cfg["hidden_size"].as_u64().unwrap());
    assert_eq!(loaded.hidden_size(), Some(shape.hidden));
    assert_eq!(shape.intermediate as u64, cfg["intermediate_size"].as_u64().unwrap());
    let query = shape.linears.iter().find(|(n, _, _)| n.ends_with("layer.0.attention.self.query")).expect("query");
    assert_eq!((query.1, query.2), (shape.hidden, shape.hidden));
    let broken = copy_tiny(|d| std::fs::write(d.join("config.json"), "{").expect("write"));
    assert!(ModelShape::read(broken.path()).is_err());
    Ok(())
}
