//! WGSL compute through wgpu on the browser's WebGPU, on the page's main thread.
#![cfg(target_arch = "wasm32")]

use shoal_shared::gpu::Gpu;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn axpy_kernel_matches_the_cpu_on_browser_webgpu() {
    let gpu = Gpu::new()
        .await
        .expect("headless Chromium runs with WebGPU enabled");
    assert_eq!(gpu.adapter.backend, "webgpu");
    let n = 1000; // not a multiple of the workgroup size: the bounds check matters
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| 3.0 - i as f32).collect();
    let got = gpu.axpy(-2.0, &x, &y).await.expect("kernel runs");
    let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| -2.0 * x + y).collect();
    assert_eq!(got, want);
}
