/// Errors of the IVON crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Occurs when a hyper-parameter is out of range; names the field and the value.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidHyperParameter { field: &'static str, value: String, reason: &'static str },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
