//! WGSL compute through wgpu on WebGPU inside a dedicated Web Worker, where Shoal trains.
#![cfg(target_arch = "wasm32")]

use shoal_shared::gpu::Gpu;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

#[wasm_bindgen_test]
async fn axpy_kernel_runs_in_a_dedicated_worker() {
    let gpu = Gpu::new()
        .await
        .expect("WebGPU is exposed to dedicated workers");
    let x: Vec<f32> = (0..300).map(|i| i as f32).collect();
    let y = vec![0.25f32; 300];
    let got = gpu.axpy(4.0, &x, &y).await.expect("kernel runs");
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 4.0 * i as f32 + 0.25, "element {i}");
    }
}
