//! Flat f32 views of a list of candle `Var`s: the common plumbing of [`crate::Ivon`],
//! [`crate::AdamW`] and [`crate::Sgd`].
//!
//! Every optimizer here keeps its parameters (and state) as one flat `Vec<f32>` in var order and
//! writes them back into the vars after an update. Keeping an f32 master copy is what makes
//! tiny IVON steps survive bf16 weights (`specs/ivon.md`, "Keep μ, m, h and the noise in f32").
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Storage, Tensor, Var};

use crate::error::{Error, Result};

/// One registered var and its slice of the flat vectors.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub var: Var,
    pub offset: usize,
    pub len: usize,
    pub shape: Shape,
}

/// Vars checked for one device, one float dtype and no duplicates.
#[derive(Debug, Clone)]
pub(crate) struct FlatVars {
    pub slots: Vec<Slot>,
    pub numel: usize,
    pub device: Device,
    pub dtype: DType,
}

impl FlatVars {
    /// Checks the vars (float, same device and dtype, each once) and lays them out flat.
    pub fn new(vars: Vec<Var>) -> Result<Self> {
        let first = vars.first().ok_or(Error::NoVars)?;
        let device = first.device().clone();
        let dtype = first.dtype();
        let mut slots = Vec::with_capacity(vars.len());
        let mut offset = 0;
        for (index, var) in vars.into_iter().enumerate() {
            if !var.dtype().is_float() {
                return Err(Error::NonFloatVar { index, dtype: var.dtype() });
            }
            if !var.device().same_device(&device) {
                return Err(Error::MixedDevices {
                    index,
                    expected: format!("{:?}", device.location()),
                    got: format!("{:?}", var.device().location()),
                });
            }
            if var.dtype() != dtype {
                return Err(Error::MixedDTypes { index, expected: dtype, got: var.dtype() });
            }
            if let Some(first) = slots.iter().position(|s: &Slot| s.var.id() == var.id()) {
                return Err(Error::DuplicateVar { index, first });
            }
            let len = var.elem_count();
            let shape = var.shape().clone();
            slots.push(Slot { var, offset, len, shape });
            offset += len;
        }
        Ok(Self { slots, numel: offset, device, dtype })
    }

    /// Reads the current values of all vars into one flat f32 vector.
    pub fn read_values(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel];
        for (index, s) in self.slots.iter().enumerate() {
            read_f32(s.var.as_tensor(), index, &mut out[s.offset..s.offset + s.len])?;
        }
        Ok(out)
    }

    /// Writes `values` (flat, var order) into the vars, cast to their dtype. On a GPU the whole
    /// vector goes up in one transfer and each var is set by a device copy: a transfer per var
    /// costs a host synchronisation each (hundreds of LoRA vars, several writes per step).
    pub fn write_values(&self, values: &[f32]) -> Result<()> {
        debug_assert_eq!(values.len(), self.numel);
        if self.device.is_cpu() {
            for s in &self.slots {
                let t = Tensor::from_slice(&values[s.offset..s.offset + s.len], s.shape.clone(), &self.device)?;
                let t = if self.dtype == DType::F32 { t } else { t.to_dtype(self.dtype)? };
                s.var.set(&t)?;
            }
            return Ok(());
        }
        let all = Tensor::from_slice(values, values.len(), &self.device)?;
        let all = if self.dtype == DType::F32 { all } else { all.to_dtype(self.dtype)? };
        for s in &self.slots {
            s.var.set(&all.narrow(0, s.offset, s.len)?.reshape(s.shape.clone())?)?;
        }
        Ok(())
    }

    /// The gradients in `grads` of the slots that `wanted` selects, readable as host f32
    /// slices. Checks every gradient's element count.
    pub fn host_grads(&self, grads: &GradStore, wanted: impl Fn(usize) -> bool) -> Result<HostGrads> {
        let mut tensors = Vec::with_capacity(self.slots.len());
        for (index, s) in self.slots.iter().enumerate() {
            let g = if wanted(index) { grads.get(s.var.as_tensor()).cloned() } else { None };
            if let Some(g) = &g {
                if g.elem_count() != s.len {
                    return Err(Error::GradientShape { index, expected: s.len, got: g.elem_count() });
                }
            }
            tensors.push(g);
        }
        let gathered = if self.device.is_cpu() {
            None
        } else {
            // One device→host transfer for all gradients instead of one (and a sync) per var.
            let mut offsets = Vec::with_capacity(tensors.len());
            let mut parts = Vec::new();
            let mut at = 0;
            for t in &tensors {
                offsets.push(at);
                if let Some(t) = t {
                    parts.push(t.flatten_all()?.to_dtype(DType::F32)?);
                    at += t.elem_count();
                }
            }
            let host = if parts.is_empty() { vec![] } else { Tensor::cat(&parts, 0)?.to_vec1::<f32>()? };
            Some((host, offsets))
        };
        Ok(HostGrads { tensors, gathered })
    }

    /// Position of `var` in the slots.
    pub fn index_of(&self, var: &Var) -> Result<usize> {
        self.slots.iter().position(|s| s.var.id() == var.id()).ok_or(Error::UnknownVar { id: var.id() })
    }
}

/// Gradients of a [`FlatVars`]' slots as host f32 slices: on the CPU lent from each tensor's
/// storage where possible (no copy), on a GPU from one gathered download.
pub(crate) struct HostGrads {
    tensors: Vec<Option<Tensor>>,
    /// GPU: every present gradient, concatenated in slot order, and each slot's offset in it.
    gathered: Option<(Vec<f32>, Vec<usize>)>,
}

impl HostGrads {
    /// Calls `f` with slot `index`'s gradient; `None` when the slot has none (or was not wanted).
    pub fn visit<R>(&self, index: usize, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
        let Some(t) = &self.tensors[index] else {
            return Ok(None);
        };
        match &self.gathered {
            Some((host, offsets)) => Ok(Some(f(&host[offsets[index]..offsets[index] + t.elem_count()]))),
            None => visit_f32(t, index, t.elem_count(), f).map(Some),
        }
    }
}

/// Calls `f` with the elements of tensor `t` (any float dtype and device, any layout) as f32.
///
/// Fast path: a contiguous f32 CPU tensor is lent straight from its storage, with no copy
/// (reading gradients is a large part of an optimizer step on CPU). `index` and `expected`
/// only serve the error message.
pub(crate) fn visit_f32<R>(t: &Tensor, index: usize, expected: usize, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.elem_count() != expected {
        return Err(Error::GradientShape { index, expected, got: t.elem_count() });
    }
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// Copies tensor `t` as f32 into `out` (see [`visit_f32`]).
pub(crate) fn read_f32(t: &Tensor, index: usize, out: &mut [f32]) -> Result<()> {
    visit_f32(t, index, out.len(), |v| out.copy_from_slice(v))
}

/// Writes named flat f32 vectors and one JSON metadata entry (`key`) to a safetensors file,
/// through a temporary file and a rename.
pub(crate) fn save_flat(path: &std::path::Path, tensors: &[(&str, &[f32])], key: &str, json: String) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let st = |source| Error::Safetensors { path: path.into(), cause: source };
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, v), b)| Ok((*name, TensorView::new(Dtype::F32, vec![v.len()], b).map_err(st)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let meta = std::collections::HashMap::from([(key.to_string(), json)]);
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|source| Error::Safetensors { path: tmp.clone(), cause: source })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.into(), cause: source })
}

/// Reads a file written by [`save_flat`]: the JSON under `key` and a reader of named f32
/// vectors of length `numel` (a wrong dtype or length is an [`Error::StateMismatch`]).
pub(crate) fn load_flat(
    path: &std::path::Path,
    key: &str,
) -> Result<(String, std::collections::HashMap<String, Vec<f32>>)> {
    use safetensors::tensor::Dtype;
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.into(), cause: source })?;
    let st = |source| Error::Safetensors { path: path.into(), cause: source };
    let mismatch = |reason: String| Error::StateMismatch { path: path.into(), reason };
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(st)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(st)?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .cloned()
        .ok_or_else(|| mismatch(format!("no `{key}` metadata: not a state file of this optimizer")))?;
    let mut out = std::collections::HashMap::new();
    for (name, t) in file.tensors() {
        if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
            return Err(mismatch(format!("tensor `{name}` is {:?} {:?}, expected flat F32", t.dtype(), t.shape())));
        }
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(name, v);
    }
    Ok((json, out))
}
