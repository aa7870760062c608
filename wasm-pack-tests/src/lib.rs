//! Browser tests of Shoal. The tests live in `tests/` and run only on
//! `wasm32-unknown-unknown`, in headless Chromium with WebGPU, through
//! `cargo xtask test`. The end-to-end tests (Playwright) live in `e2e/`.
