//! The browser side of the peer: the functions and classes the contributor page's Web
//! Worker (and the benchmark page) call.

use std::cell::RefCell;
use std::rc::Rc;

use shoal_shared::engine::gpu::MatmulRunner;
use shoal_shared::engine::train::Trainer;
use shoal_shared::engine::{AnyBackend, Backend};
use shoal_shared::gpu::Gpu;
use shoal_shared::rng::SplitMix64;
use wasm_bindgen::prelude::*;

mod observer;
mod peer;
mod transport;
pub use observer::SwarmObserver;
pub use peer::SwarmPeer;
pub use transport::Swarm;

/// Milliseconds on a clock that only moves forward: the global `performance` clock
/// (`timeOrigin + now()`, in the range of `Date.now()`), where the wall clock can jump
/// (a synchronization, a suspended laptop) and would fire or hold every deadline the
/// peer and the mesh keep. `Date.now()` only where there is no `performance`.
pub(crate) fn now_ms() -> f64 {
    let global = js_sys::global();
    let perf = js_sys::Reflect::get(&global, &"performance".into()).ok();
    let read = |name: &str| -> Option<f64> {
        let perf = perf.as_ref()?;
        let v = js_sys::Reflect::get(perf, &name.into()).ok()?;
        match v.dyn_ref::<js_sys::Function>() {
            Some(f) => f.call0(perf).ok()?.as_f64(),
            None => v.as_f64(),
        }
    };
    match (read("timeOrigin"), read("now")) {
        (Some(origin), Some(now)) => origin + now,
        _ => js_sys::Date::now(),
    }
}

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

/// A training loop over the demo digits, driven from JavaScript: `run(steps)` enqueues
/// steps, `loss()` waits for them and reads the loss back.
#[wasm_bindgen]
pub struct DigitsTrainer {
    /// `None` while a `loss()` readback has the trainer (across its await).
    inner: Rc<RefCell<Option<Trainer<AnyBackend>>>>,
}

#[wasm_bindgen]
impl DigitsTrainer {
    /// `model` is "mlp" or "cnn"; `backend` is "webgpu" or "cpu"; `images` and `labels`
    /// are IDX files.
    pub async fn create(
        model: String,
        backend: String,
        images: Vec<u8>,
        labels: Vec<u8>,
        batch: usize,
        lr: f32,
    ) -> Result<DigitsTrainer, JsError> {
        let gpu = match backend.as_str() {
            "webgpu" => Some(Gpu::new().await.map_err(|e| JsError::new(&e.to_string()))?),
            "cpu" => None,
            other => return Err(JsError::new(&format!("unknown backend {other:?}"))),
        };
        let trainer = crate::digits_trainer(&model, gpu.as_ref(), &images, &labels, batch, lr, 1)
            .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            inner: Rc::new(RefCell::new(Some(trainer))),
        })
    }

    /// Runs (on WebGPU: enqueues) `steps` training steps.
    pub fn run(&self, steps: usize) -> Result<(), JsError> {
        let mut slot = self.inner.borrow_mut();
        let t = slot
            .as_mut()
            .ok_or_else(|| JsError::new("trainer is busy reading the loss"))?;
        t.run(steps).map_err(|e| JsError::new(&e.to_string()))
    }

    /// Resolves, once every enqueued step has run, to the last step's loss.
    pub fn loss(&self) -> js_sys::Promise {
        let inner = Rc::clone(&self.inner);
        wasm_bindgen_futures::future_to_promise(async move {
            let taken = inner.borrow_mut().take();
            let mut t = taken.ok_or_else(|| JsError::new("trainer is busy reading the loss"))?;
            let loss = t.backend.loss().await;
            *inner.borrow_mut() = Some(t);
            let loss = loss.map_err(|e| JsError::new(&e.to_string()))?;
            Ok(JsValue::from_f64(f64::from(loss)))
        })
    }

    /// "webgpu" or "cpu".
    pub fn backend(&self) -> String {
        self.inner
            .borrow()
            .as_ref()
            .map_or("busy", |t| t.backend.name())
            .to_string()
    }
}

/// The WGSL matrix-product kernel on its own, for the benchmark page.
#[wasm_bindgen]
pub struct MatmulBench {
    runner: Rc<MatmulRunner>,
}

#[wasm_bindgen]
impl MatmulBench {
    /// Square `n x n` product of seeded random matrices.
    pub async fn create(n: usize) -> Result<MatmulBench, JsError> {
        let gpu = Gpu::new().await.map_err(|e| JsError::new(&e.to_string()))?;
        let mut rng = SplitMix64::new(1);
        let a: Vec<f32> = (0..n * n).map(|_| rng.normal_f32()).collect();
        let b: Vec<f32> = (0..n * n).map(|_| rng.normal_f32()).collect();
        Ok(Self {
            runner: Rc::new(MatmulRunner::new(&gpu, &a, &b, (n, n, n), (false, false))),
        })
    }

    /// Enqueues `reps` products.
    pub fn run(&self, reps: usize) {
        self.runner.run(reps);
    }

    /// Resolves to the first element of the product once everything enqueued has run.
    pub fn sync(&self) -> js_sys::Promise {
        let runner = Rc::clone(&self.runner);
        wasm_bindgen_futures::future_to_promise(async move {
            let c = runner
                .result()
                .await
                .map_err(|e| JsError::new(&e.to_string()))?;
            Ok(JsValue::from_f64(f64::from(
                c.first().copied().unwrap_or(0.0),
            )))
        })
    }
}
