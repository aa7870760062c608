//! The browser side of the peer: the functions the contributor page's Web Worker calls.

use wasm_bindgen::prelude::*;

/// Runs once when the module is instantiated.
#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Asks the browser for a WebGPU adapter, proves it with a small compute kernel, and
/// returns the backend choice as JSON (`{"backend":"gpu","adapter":{...}}` or
/// `{"backend":"cpu","reason":"..."}`), plus `"check"` with the kernel's verdict.
#[wasm_bindgen]
pub async fn probe() -> String {
    let (choice, gpu) = crate::probe_backend().await;
    let check = match gpu {
        Some(gpu) => {
            let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
            let y = vec![1.0f32; 256];
            match gpu.axpy(2.0, &x, &y).await {
                Ok(r)
                    if r.iter()
                        .enumerate()
                        .all(|(i, &v)| v == 2.0 * i as f32 + 1.0) =>
                {
                    "ok".to_string()
                }
                Ok(_) => "wrong results".to_string(),
                Err(e) => e.to_string(),
            }
        }
        None => "skipped".to_string(),
    };
    let mut value = serde_json::to_value(&choice).unwrap_or_default();
    value["check"] = check.into();
    value.to_string()
}
