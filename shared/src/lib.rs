//! Shoal's core library: protocol types, tasks, the learning algorithm and the peer,
//! trust and privacy. The training engine, the GPU context and the data formats live in
//! `shoal-engine` and are re-exported here under their names (`engine`, `gpu`, `dataset`,
//! `idx`, `rng`).
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
pub mod rate;
pub mod task;
pub mod trust;

pub use shoal_engine::{dataset, engine, gpu, idx, rng};
