//! Terminal rendering: progress bars for training and evaluation.
pub mod progress;
