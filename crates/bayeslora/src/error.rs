//! The one error type of the `bayeslora` library. Every variant carries the context a user needs
//! (file, tensor, row, value) and, where there is one, the fix. Messages are lower case.
use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Occurs when a file cannot be read or written. The I/O error is part of this message, not
    /// a separate `source()`, so a printed error chain states the reason once.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    /// Occurs when a tensor in a checkpoint has the wrong shape for the config.
    #[error(
        "{file}: tensor `{name}` has shape {got:?}, expected {expected:?}; does config.json belong to these weights?"
    )]
    TensorShape { file: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    /// Occurs when a tensor the architecture needs is absent from the checkpoint.
    #[error("{file}: tensor `{name}` is missing; is this the right checkpoint for the architecture?")]
    MissingTensor { file: PathBuf, name: String },
    /// Occurs when a checkpoint file is corrupt or not in the expected format.
    #[error("{file}: {reason}")]
    BadFile { file: PathBuf, reason: String },
    /// Occurs when `--resume` finds checkpoints but every one is damaged (one reason per
    /// checkpoint, newest first, each naming the file).
    #[error(
        "no usable checkpoint in {dir}:\n  {}\na damaged checkpoint cannot be repaired: train again without --resume \
         (with --overwrite, or into a new output folder)",
        .reasons.join("\n  ")
    )]
    NoUsableCheckpoint { dir: PathBuf, reasons: Vec<String> },
    /// Occurs when a checkpoint cannot be written (a full disk, a write error); training stops
    /// there. `cause` names the file; `after` says what is left to resume from.
    #[error("writing the checkpoint of step {step}: {cause}; {after}")]
    CheckpointWrite { step: usize, cause: Box<Error>, after: String },
    /// Occurs when a data row cannot be parsed.
    #[error("{file}:{line}: {reason}")]
    DataRow { file: PathBuf, line: usize, reason: String },
    /// Occurs when config.json names an architecture we do not implement.
    #[error("unknown architecture `{found}` in {file}; supported: {supported}")]
    UnknownArchitecture { file: PathBuf, found: String, supported: String },
    /// Occurs when a configuration value is invalid.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidConfig { field: String, value: String, reason: String },
    /// Occurs when a training run's estimated peak memory exceeds what the device has (checked
    /// before the model loads: `train::memory::check`).
    #[error(
        "this run needs about {needed} ({parts}) but {device}; {advice}, or pass --skip-memory-check to start anyway"
    )]
    MemoryEstimate { needed: String, parts: String, device: String, advice: String },
    /// Occurs when the ranks of a data-parallel run disagree or a collective fails.
    #[error("data-parallel training: {0}")]
    Distributed(String),
    /// Occurs when the training loss becomes NaN or infinite.
    #[error("non-finite loss {loss} at step {step}; lower the learning rate or check the data")]
    NonFiniteLoss { step: usize, loss: f32 },
    /// Occurs when the tokenizer fails to load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Occurs when a step of a run (`run`: open, load, train, evaluate, export) fails or cannot
    /// start; `context` says which step and file and, where there is one, the fix; `source` (if
    /// any) why. Printed as a chain, `context: source`, like anyhow's `with_context`.
    #[error("{context}")]
    Run {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// An error from serde_json (a value that cannot be represented as JSON).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// An error from the IVON optimizer crate.
    #[error(transparent)]
    Ivon(#[from] ivon::Error),
    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
    /// Shorthand for [`Error::Run`] without a source.
    pub fn run(context: impl Into<String>) -> Self {
        Error::Run { context: context.into(), source: None }
    }
    /// Shorthand for [`Error::InvalidConfig`].
    pub fn config(field: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field: field.into(), value: value.to_string(), reason: reason.into() }
    }
}

/// `with_context` for library results and options, as anyhow has it for the binary: wraps the
/// error as the source of an [`Error::Run`] whose message says what was being done.
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Run { context: context.into(), source: Some(e.into()) })
    }
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Run { context: context().into(), source: Some(e.into()) })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::run(context))
    }
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| Error::run(context()))
    }
}
