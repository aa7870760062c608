//! The researcher's side of Shoal in the browser, in a bundle of its own: the dashboard's
//! observer peer ([`SwarmObserver`], run by `www/observer-worker.js`), with the model's
//! evaluation and its safetensors export. Visitors download only the contributor's
//! bundle (`shoal-web-client`); this one links that crate and adds the observer, so its
//! JS glue exports everything the contributor's does too.
#![cfg(target_arch = "wasm32")]

mod observer;
pub use observer::SwarmObserver;
