//! # bayeslora
//!
//! Bayesian low-rank finetuning of language models on candle: LoRA adapters trained with the IVON
//! variational optimizer (IVON-LoRA, arXiv 2411.04421), evaluated with the posterior predictive.
//!
//! Data flows one way: `models` (load; every linear an adapter slot) → `adapters` (attach) →
//! `data` → `train` → `eval` → `plot` → `baselines` / `export`; `run` opens, trains, evaluates and
//! exports a run folder with all of them (and `run::compare` sweeps methods × tasks × seeds), so
//! each command of the binary is a few lines; `bench` times training and attention on real or
//! random-weight models for `bayeslora bench`.

pub mod adapters;
mod atomic;
pub mod baselines;
pub mod bench;
pub mod data;
mod error;
pub mod eval;
pub mod export;
#[doc(hidden)]
pub mod fuzz;
pub mod models;
pub mod ops;
pub mod plot;
pub mod run;
pub mod train;

pub use error::{Error, Result};
pub use ivon;
