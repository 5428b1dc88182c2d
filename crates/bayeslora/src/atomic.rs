//! Atomic file output: write to a temporary file beside the target, flush it to disk, then
//! rename over the target. A crash, a full disk or Ctrl-C leaves either the old file or the new
//! one, never a torn one. The parent folder is fsynced after the rename, so the new name
//! itself survives a power loss.
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling used while writing `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Some(dir) = path.parent() {
        sync_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir });
    }
    Ok(())
}

/// Flushes a folder's entries (creations, renames) to disk. Best effort: some file systems
/// and platforms cannot fsync a folder, and the data files themselves are already synced.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Writes JSON (pretty) atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::BadFile { file: path.into(), reason: format!("cannot serialize: {e}") })?;
    write(path, text.as_bytes())
}

/// Saves named tensors as safetensors atomically, with string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = tensors.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut bytes = safetensors::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .map_err(|e| Error::BadFile { file: path.into(), reason: e.to_string() })?;
    sort_metadata(&mut bytes);
    write(path, &bytes)
}

/// Rewrites the `__metadata__` object of serialized safetensors bytes with its keys sorted.
/// safetensors serializes the metadata `HashMap` in its random iteration order, so without this
/// two runs write different bytes for the same content. The header keeps its length (same keys
/// and values, other order; the padding spaces are kept), so the tensor offsets stay valid.
fn sort_metadata(bytes: &mut [u8]) {
    let Some(len) = bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes) else {
        return;
    };
    let Some(end) = usize::try_from(len).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len()) else {
        return;
    };
    let header = &bytes[8..end];
    let Ok(map) = serde_json::from_slice::<std::collections::BTreeMap<String, serde_json::Value>>(header) else {
        return;
    };
    let mut sorted = String::from("{");
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            sorted.push(',');
        }
        let value = match (k.as_str(), v) {
            ("__metadata__", serde_json::Value::Object(m)) => {
                let m: std::collections::BTreeMap<&String, &serde_json::Value> = m.iter().collect();
                serde_json::to_string(&m)
            }
            _ => serde_json::to_string(v),
        };
        let (Ok(key), Ok(value)) = (serde_json::to_string(k), value) else {
            return;
        };
        sorted.push_str(&key);
        sorted.push(':');
        sorted.push_str(&value);
    }
    sorted.push('}');
    if sorted.len() <= header.len() {
        let padded = format!("{sorted:<width$}", width = header.len());
        bytes[8..end].copy_from_slice(padded.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_leaves_no_temp() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let p = dir.path().join("a/b.json");
        write(&p, b"one")?;
        write(&p, b"two")?;
        assert_eq!(std::fs::read(&p).map_err(|e| Error::io(&p, e))?, b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap_or(dir.path()))
            .map_err(|e| Error::io(dir.path(), e))?
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(names.len(), 1);
        Ok(())
    }

    #[test]
    fn unwritable_target_names_the_path() {
        let err = write(Path::new("/proc/definitely/not/here.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("/proc/definitely"), "{err}");
    }
}
