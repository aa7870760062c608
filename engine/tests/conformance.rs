//! The engine's conformance suite natively: wgpu on the machine's Vulkan driver (Mesa's
//! lavapipe where there is no GPU; `cargo xtask test` installs it) against the CPU
//! reference. The same suite runs in headless Chromium from `wasm-pack-tests`.

use shoal_engine::engine::conformance as suite;
use shoal_engine::gpu::Gpu;

fn gpu() -> Gpu {
    pollster::block_on(Gpu::new())
        .expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)")
}

#[test]
fn matmul_kernel_matches_reference() {
    pollster::block_on(suite::matmul_matches_reference(&gpu()));
}

#[test]
fn every_op_forward_and_backward_matches_cpu() {
    pollster::block_on(suite::gradients_match_cpu(&gpu()));
}

#[test]
fn training_steps_match_cpu() {
    pollster::block_on(suite::training_steps_match_cpu(&gpu()));
}

#[test]
fn peer_rounds_match_cpu() {
    pollster::block_on(suite::peer_rounds_match_cpu(&gpu()));
}

#[test]
fn gpu_never_lets_non_finite_values_pass() {
    pollster::block_on(suite::gpu_non_finite_never_passes(&gpu()));
}

#[test]
fn gpu_refuses_grids_past_its_limits() {
    pollster::block_on(suite::gpu_refuses_grids_past_its_limits(&gpu()));
}

#[test]
fn specs_past_32_bits_are_refused() {
    pollster::block_on(suite::specs_past_32_bits_are_refused());
}

#[test]
fn cpu_never_lets_non_finite_values_pass() {
    pollster::block_on(suite::cpu_non_finite_never_passes());
}

#[test]
fn cpu_gradients_match_finite_differences() {
    pollster::block_on(suite::cpu_gradients_match_finite_differences());
}

#[test]
fn cpu_lm_gradients_match_finite_differences() {
    pollster::block_on(suite::cpu_lm_gradients_match_finite_differences());
}

#[test]
fn cpu_step_is_deterministic() {
    pollster::block_on(suite::cpu_step_is_deterministic());
}

#[test]
fn kernels_are_compiled_for_the_layers_a_model_has() {
    pollster::block_on(suite::kernels_are_compiled_for_the_layers_a_model_has(
        &gpu(),
    ));
}

#[test]
fn backends_on_one_device_share_their_kernels() {
    pollster::block_on(suite::backends_on_one_device_share_their_kernels(&gpu()));
}
