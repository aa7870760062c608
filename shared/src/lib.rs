//! Shoal's core library: data formats, the GPU context and (as the engine grows) the
//! model, training engine, protocol types and learning algorithm.
//!
//! This crate compiles for `wasm32-unknown-unknown` and natively from the same code. It
//! knows nothing of browsers, sockets, axum or tokio: platform code lives in
//! `web-client` and `signaling-server`.

pub mod export;
pub mod framing;
pub mod learn;
pub mod local;
pub mod privacy;
pub mod protocol;
pub mod task;
pub mod trust;

pub use shoal_engine::{dataset, engine, gpu, idx, rng};
