//! Shoal's training engine and what it needs beneath it: the model and its two backends
//! (`engine`), the GPU context (`gpu`), the datasets it trains on (`dataset`, `idx`) and
//! the seeded random numbers every peer draws alike (`rng`).
//!
//! A crate of its own so that the browser build can compile it for speed while the rest of
//! the client is compiled for size (the workspace's `wasm-release` profile): the CPU
//! backend's kernels carry a visitor's training (what runs once a round outside this
//! crate — aggregation, compression, framing, hashes — is compiled for size).
//! `shoal-shared` re-exports every module under the same name, so `shoal_shared::engine`
//! is this crate's `engine`.

pub mod dataset;
pub mod engine;
pub mod gpu;
pub mod idx;
pub mod rng;
