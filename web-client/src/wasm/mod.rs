//! The browser side of the peer: the functions and classes the contributor page's Web
//! Worker and its relay call, and the benchmark page's trainers (so that the benchmarks
//! measure the bundle visitors run). The dashboard's observer is in a bundle of its own
//! (`shoal-dashboard-client`), built on [`Relay`] and [`now_ms`] from here.

use std::cell::RefCell;
use std::rc::Rc;

use shoal_shared::engine::gpu::MatmulRunner;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, Backend, Model};
use shoal_shared::gpu::Gpu;
use shoal_shared::rng::SplitMix64;
use shoal_shared::task::TaskSpec;
use wasm_bindgen::prelude::*;

mod local;
mod peer;
mod transport;
pub use local::LocalFiles;
pub use peer::secure_random;
pub use peer::{EarlyEvents, Relay, SwarmPeer};
pub use transport::Swarm;

/// Milliseconds on a clock that only moves forward: the global `performance` clock
/// (`timeOrigin + now()`, in the range of `Date.now()`), where the wall clock can jump
/// (a synchronization, a suspended laptop) and would fire or hold every deadline the
/// peer and the mesh keep. `Date.now()` only where there is no `performance`.
pub fn now_ms() -> f64 {
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

/// The size of this module's linear memory in bytes: its peak, since wasm memory only
/// grows.
#[wasm_bindgen(js_name = wasmMemoryBytes)]
pub fn wasm_memory_bytes() -> f64 {
    wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        .map_or(0.0, |m| {
            m.buffer()
                .dyn_into::<js_sys::ArrayBuffer>()
                .map_or(0.0, |b| f64::from(b.byte_length()))
        })
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

/// The SHA-256 of `bytes` as 64 lowercase hex digits: the workers check the task's data
/// files with it (`www/data.js`). WebCrypto's digest exists only on secure pages (HTTPS
/// or localhost), and a page served over plain HTTP from a LAN address failed there.
#[wasm_bindgen(js_name = sha256Hex)]
pub fn sha256_hex(bytes: &[u8]) -> String {
    shoal_shared::learn::identity::hex(&shoal_shared::trust::receipt::sha256(bytes))
}

/// A training loop for benchmarks, driven from JavaScript: `run(steps)` enqueues steps,
/// `loss()` waits for them and reads the loss back.
#[wasm_bindgen]
pub struct BenchTrainer {
    /// `None` while a `loss()` readback has the trainer (across its await).
    inner: Rc<RefCell<Option<Trainer<AnyBackend>>>>,
    /// Predictions per training step (batch x positions).
    predictions: usize,
}

async fn bench_gpu(backend: &str) -> Result<Option<Gpu>, JsError> {
    match backend {
        "webgpu" => Ok(Some(
            Gpu::new().await.map_err(|e| JsError::new(&e.to_string()))?,
        )),
        "cpu" => Ok(None),
        other => Err(JsError::new(&format!("unknown backend {other:?}"))),
    }
}

#[wasm_bindgen]
impl BenchTrainer {
    /// The demo digits: `model` is "mlp" or "cnn"; `backend` is "webgpu" or "cpu";
    /// `images` and `labels` are IDX files.
    pub async fn digits(
        model: String,
        backend: String,
        images: Vec<u8>,
        labels: Vec<u8>,
        batch: usize,
        lr: f32,
    ) -> Result<BenchTrainer, JsError> {
        let gpu = bench_gpu(&backend).await?;
        let trainer = crate::digits_trainer(&model, gpu.as_ref(), &images, &labels, batch, lr, 1)
            .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            inner: Rc::new(RefCell::new(Some(trainer))),
            predictions: batch,
        })
    }

    /// A task's model, data, batch and optimizer: `task` is its JSON (as `/api/tasks/{name}`
    /// serves it; `cargo xtask bench` writes the demo LM's), `files`
    /// the bytes of its data files in the order the task lists them (`data.train`, then
    /// `data.test`). The GPU backend falls back to the CPU for what WGSL does not cover,
    /// as a peer does; `backend()` says which ran.
    pub async fn task(
        task: String,
        backend: String,
        files: Vec<js_sys::Uint8Array>,
    ) -> Result<BenchTrainer, JsError> {
        let task = TaskSpec::from_json(&task).map_err(|e| JsError::new(&e.to_string()))?;
        let gpu = bench_gpu(&backend).await?;
        let bytes: Vec<Vec<u8>> = files.iter().map(js_sys::Uint8Array::to_vec).collect();
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let (data, _) = task
            .datasets(&refs)
            .map_err(|e| JsError::new(&e.to_string()))?;
        let model = Model::new(task.model.clone()).map_err(|e| JsError::new(&e.to_string()))?;
        let batch = task.train.batch;
        let backend = train::backend(
            model.clone(),
            gpu.as_ref(),
            task.optimizer_at(0).map_err(|e| JsError::new(&e))?,
            model.init_params(task.train.seed),
            batch,
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        let trainer = Trainer::new(backend, Samples::from_dataset(&data), batch, 1)
            .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Self {
            inner: Rc::new(RefCell::new(Some(trainer))),
            predictions: batch * model.positions(),
        })
    }

    /// Predictions per training step: the batch times the positions per sample (a
    /// language model's context; 1 for images). Tokens per step for a language model.
    #[wasm_bindgen(js_name = predictionsPerStep)]
    pub fn predictions_per_step(&self) -> usize {
        self.predictions
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
