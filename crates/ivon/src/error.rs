//! The crate's one error type.
use std::path::PathBuf;

/// Errors of the IVON crate. Each variant carries the context needed to fix the input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Occurs when a hyper-parameter is out of range; names the field (with its group when it is
    /// a per-group override, e.g. `groups[1].lr`) and the value.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidHyperParameter { field: String, value: String, reason: &'static str },
    /// Occurs when an optimizer gets no variables at all.
    #[error("the optimizer has no variables; pass at least one candle Var")]
    NoVars,
    /// Occurs when a variable is not a floating-point tensor (candle-nn silently drops these).
    #[error("var #{index} has dtype {dtype:?}, which is not a float type; only float vars can be optimized")]
    NonFloatVar { index: usize, dtype: candle_core::DType },
    /// Occurs when the variables of one optimizer live on different devices (as ivon-opt refuses).
    #[error("var #{index} is on {got}, but var #0 is on {expected}; put all vars of one optimizer on one device")]
    MixedDevices { index: usize, expected: String, got: String },
    /// Occurs when the variables of one optimizer have different dtypes (as ivon-opt refuses).
    #[error("var #{index} has dtype {got:?}, but var #0 has {expected:?}; use one dtype per optimizer")]
    MixedDTypes { index: usize, expected: candle_core::DType, got: candle_core::DType },
    /// Occurs when the same variable is passed twice.
    #[error("var #{index} was already given (as var #{first}); pass each var once")]
    DuplicateVar { index: usize, first: usize },
    /// Occurs when a gradient does not have the element count of its variable.
    #[error("gradient of var #{index} has {got} elements, the var has {expected}")]
    GradientShape { index: usize, expected: usize, got: usize },
    /// Occurs when a variable is looked up that is not in the optimizer.
    #[error("var {id:?} is not in this optimizer")]
    UnknownVar { id: candle_core::TensorId },
    /// Occurs when `step()` is called before any sampled gradient was recorded.
    #[error("IVON step() without samples: record gradients at sampled weights first (with_sampled_params / sample().accumulate().finish())")]
    NoSamples,
    /// Occurs when a sample is finished without any gradient accumulated into it.
    #[error("sample finished without gradients: call Sample::accumulate(&grads) at least once")]
    EmptySample,
    /// Occurs when state is saved between `sample()` and `step()`.
    #[error("cannot save the optimizer state with {count} unapplied sample(s); call step() first")]
    PendingSamples { count: usize },
    /// Occurs when a saved state does not fit the optimizer it is loaded into.
    #[error("state {path}: {reason}")]
    StateMismatch { path: PathBuf, reason: String },
    /// An I/O error, with the file it happened on.
    /// (The cause is part of the message, not a `source()`, so a printed chain states it once.)
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    /// A safetensors error, with the file it happened on.
    #[error("{path}: {cause}")]
    Safetensors { path: PathBuf, cause: safetensors::SafeTensorError },
    /// A JSON error in the metadata of a state file.
    #[error("{path}: bad metadata JSON: {cause}")]
    Json { path: PathBuf, cause: serde_json::Error },
    /// An error from the user's sync (all-reduce) hook.
    #[error("sync hook failed: {0}")]
    Sync(String),
    /// Occurs when the device path (feature `cuda`) meets vars or gradients it cannot use, e.g.
    /// a var moved to another device or a non-contiguous var.
    #[error("ivon on the device: {reason}")]
    Device { reason: String },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::InvalidHyperParameter`].
pub(crate) fn invalid(field: impl Into<String>, value: impl ToString, reason: &'static str) -> Error {
    Error::InvalidHyperParameter { field: field.into(), value: value.to_string(), reason }
}
