//! IVON optimizer (in progress).
mod error;
pub use error::Error;
