//! Adapters: trainable low-rank paths that ride on a frozen linear layer.
//!
//! Every linear layer of every model is a [`Linear`] (`models/linear.rs`): a frozen
//! `weight`/`bias` plus an optional [`Adapter`]. A model never knows which method the adapter
//! implements; `adapters::attach` walks a model's linears by their HF names and installs one
//! adapter per matched layer.
//!
//! # Adding a method
//! Implement [`Adapter`] (the forward delta and the trainable vars, named as on disk), give it a
//! config with PEFT's field names, and an `attach`-style function in its own folder (`lora/`).
pub mod blora;
pub mod lora;

pub use blora::{attach_blora, BLoraConfig};
pub use lora::{attach, LoraConfig};

pub use crate::models::linear::{Adapter, Ctx, HasLinears, Linear};
