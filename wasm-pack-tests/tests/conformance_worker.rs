//! The engine's conformance suite on the browser's WebGPU, in a dedicated Web Worker
//! (where Shoal trains): the same checks as `engine/tests/conformance.rs` natively.
#![cfg(target_arch = "wasm32")]

use shoal_shared::engine::conformance as suite;
use shoal_shared::gpu::Gpu;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

thread_local! {
    static GPU: std::cell::RefCell<Option<Gpu>> = const { std::cell::RefCell::new(None) };
}

/// One device for every test here, as a page has: the kernels one test compiled, the
/// next reuses (software WebGPU takes seconds to compile a backend's set). A device that
/// is lost is forgotten, so the next test opens its own rather than failing for it.
async fn gpu() -> Gpu {
    if let Some(g) = GPU.with_borrow(Clone::clone) {
        return g;
    }
    let g = Gpu::new()
        .await
        .expect("headless Chromium runs with WebGPU enabled");
    g.device.set_device_lost_callback(|_, _| {
        let _ = GPU.try_with(|slot| slot.replace(None));
    });
    GPU.set(Some(g.clone()));
    g
}

#[wasm_bindgen_test]
async fn matmul_kernel_matches_reference() {
    suite::matmul_matches_reference(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn every_op_forward_and_backward_matches_cpu() {
    suite::gradients_match_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn backends_on_one_device_share_their_kernels() {
    suite::backends_on_one_device_share_their_kernels(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn kernels_are_compiled_for_the_layers_a_model_has() {
    suite::kernels_are_compiled_for_the_layers_a_model_has(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn training_steps_match_cpu() {
    suite::training_steps_match_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn peer_rounds_match_cpu() {
    suite::peer_rounds_match_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn gpu_never_lets_non_finite_values_pass() {
    suite::gpu_non_finite_never_passes(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn gpu_refuses_grids_past_its_limits() {
    suite::gpu_refuses_grids_past_its_limits(&gpu().await).await;
}

/// Here in 32 bits, where sizes past 2^32 wrapped.
#[wasm_bindgen_test]
async fn specs_past_32_bits_are_refused() {
    suite::specs_past_32_bits_are_refused().await;
}

#[wasm_bindgen_test]
async fn cpu_never_lets_non_finite_values_pass() {
    suite::cpu_non_finite_never_passes().await;
}

#[wasm_bindgen_test]
async fn cpu_gradients_match_finite_differences() {
    suite::cpu_gradients_match_finite_differences().await;
}

#[wasm_bindgen_test]
async fn cpu_lm_gradients_match_finite_differences() {
    suite::cpu_lm_gradients_match_finite_differences().await;
}

#[wasm_bindgen_test]
async fn cpu_step_is_deterministic() {
    suite::cpu_step_is_deterministic().await;
}
