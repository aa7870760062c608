//! `cargo xtask bench NAME`: benchmarks that print a table and write
//! `target/bench/NAME.json` with a top-level `ratios` object (Shoal relative to the named
//! competitor, oriented so that higher is better) beside the raw medians.
//!
//! - `matmul`: GFLOP/s at 256/512/1024. Shoal's CPU kernel vs the `matrixmultiply` crate
//!   natively (`cpu-512`); Shoal's WGSL kernel vs TF.js's `matMul` in the same headless
//!   Chromium (`webgpu-512`); Shoal's WGSL kernel on the native wgpu adapter (reported).
//! - `train-throughput`: training samples/s at batch 64, MLP and CNN. Shoal's CPU backend
//!   (wasm) vs TF.js's wasm backend (`mlp-cpu`, `cnn-cpu`) and Shoal's WebGPU backend vs
//!   TF.js's webgpu backend (`mlp-webgpu`, `cnn-webgpu`), in one browser; Shoal's CPU
//!   backend natively vs PyTorch on the CPU with the same single thread (`mlp-native`,
//!   `cnn-native`); Shoal on the native wgpu adapter (reported).
//! - `signaling`: Shoal's signaling server vs the PeerJS server (`bench_signaling.rs`).
//! - `communication`: bytes per peer to the target, Shoal vs DISCO-style (`sim.rs`).
//! - `datachannel`: MB/s of a 20 MB message through Shoal's framing layer vs raw 16 KiB
//!   sends on the same kind of data channel, natively (`web-client/examples/
//!   datachannel_bench.rs`) and in Chromium (`bench-web/datachannel.mjs`), both on
//!   loopback inside a network namespace (`framing-vs-raw-native`, `framing-vs-raw-browser`).
//! - `swarm`: how much of its peers' compute the real swarm uses (`bench-web/swarm.mjs`):
//!   native peers and contributor pages in Chromium on the demo task, first each alone
//!   (its own server) all at once, then together; `swarm-utilization` (swarm samples/s
//!   over solo samples/s), `swarm-utilization-browser` (the pages') and `time-to-target`
//!   (one peer's time to the task's target over the swarm's), with bytes per peer per
//!   hour.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use shoal_shared::engine::gemm::{MatRef, gemm};
use shoal_shared::engine::gpu::MatmulRunner;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, Backend, ModelSpec};
use shoal_shared::gpu::Gpu;
use shoal_shared::rng::SplitMix64;

use crate::{data, root, run_cmd, setup, web};

/// Every benchmark this runner knows.
pub(crate) const NAMES: [&str; 7] = [
    "matmul",
    "train-throughput",
    "train-lm",
    "signaling",
    "communication",
    "datachannel",
    "swarm",
];

const BATCH: usize = 64;
/// Turns each side takes in `train-throughput`'s native comparison.
const TURNS: usize = 3;
const LR: f32 = 1e-3;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!(
            "usage: cargo xtask bench NAME (one of: {})",
            NAMES.join(", ")
        );
    };
    let root = root();
    let report = match name.as_str() {
        "matmul" => matmul(&root)?,
        "train-throughput" => train_throughput(&root)?,
        "train-lm" => train_lm(&root)?,
        "signaling" => crate::bench_signaling::signaling(&root)?,
        "communication" => crate::sim::communication(&root)?,
        "datachannel" => datachannel(&root)?,
        "swarm" => swarm(&root)?,
        other => bail!("unknown benchmark {other:?}; known: {}", NAMES.join(", ")),
    };
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("\nratios (Shoal / competitor, higher is better):");
    if let Some(r) = report["ratios"].as_object() {
        for (k, v) in r {
            println!(
                "  {k:<14} {}",
                v.as_f64().map_or("n/a".into(), |x| format!("{x:.2}"))
            );
        }
    }
    println!("wrote {}", path.display());
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        f64::NAN
    } else {
        xs[xs.len() / 2]
    }
}

fn ratio(a: &Value, b: &Value) -> Value {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

/// Median GFLOP/s of `f` (one n³ product per call) over `runs` timed runs after a warm-up.
fn gflops(n: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let flop = 2.0 * (n as f64).powi(3);
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                flop / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..len).map(|_| r.normal_f32()).collect()
}

fn matmul(root: &Path) -> Result<Value> {
    println!(
        "{:<6} {:>14} {:>18} {:>8}",
        "n", "Shoal GFLOP/s", "matrixmultiply", "ratio"
    );
    let mut native = serde_json::Map::new();
    for n in [256usize, 512, 1024] {
        let (a, b) = (random(n * n, 1), random(n * n, 2));
        let mut c = vec![0.0f32; n * n];
        let runs = if n >= 1024 { 5 } else { 9 };
        let shoal = gflops(n, runs, || {
            gemm(MatRef::new(&a, n, n), MatRef::new(&b, n, n), &mut c, false)
        });
        let mm = gflops(n, runs, || {
            #[allow(unsafe_code)]
            // SAFETY: a, b and c are n x n row-major buffers of exactly n*n elements, and
            // the strides passed describe that layout.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    n,
                    1.0,
                    a.as_ptr(),
                    n as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        });
        println!("{n:<6} {shoal:>14.1} {mm:>18.1} {:>8.2}", shoal / mm);
        native.insert(
            n.to_string(),
            json!({ "shoal_cpu_gflops": shoal, "matrixmultiply_gflops": mm }),
        );
    }
    let gpu = native_gpu_matmul();
    let browser =
        browser_bench(root, "matmul").unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    println!("browser (WebGPU, same Chromium): {browser}");
    let ratios = json!({
        "cpu-512": ratio(&native["512"]["shoal_cpu_gflops"], &native["512"]["matrixmultiply_gflops"]),
        "webgpu-512": ratio(&browser["512"]["shoal_gflops"], &browser["512"]["tfjs_gflops"]),
    });
    Ok(json!({ "ratios": ratios, "native_cpu": native, "native_gpu": gpu, "browser": browser }))
}

/// The WGSL kernel on the native adapter (lavapipe here; a real GPU elsewhere).
pub(crate) fn native_gpu_matmul() -> Value {
    let gpu = match pollster::block_on(Gpu::new()) {
        Ok(g) => g,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let mut out = serde_json::Map::new();
    out.insert("adapter".into(), json!(gpu.adapter.description));
    let big = !gpu.adapter.software;
    for n in [256usize, 512, 1024, 2048, 4096] {
        if !big && n > 512 {
            break;
        }
        let runner = MatmulRunner::new(
            &gpu,
            &random(n * n, 1),
            &random(n * n, 2),
            (n, n, n),
            (false, false),
        );
        let reps = if big {
            (1usize << 33).div_ceil(n * n * n).clamp(1, 200)
        } else {
            1
        };
        let g = gflops(n, 3, || {
            runner.run(reps);
            pollster::block_on(runner.result()).expect("readback");
        }) * reps as f64;
        println!(
            "native wgpu ({}) {n}: {g:.1} GFLOP/s",
            gpu.adapter.description
        );
        out.insert(n.to_string(), json!({ "shoal_wgsl_gflops": g }));
    }
    Value::Object(out)
}

fn load_train(root: &Path) -> Result<Samples> {
    let dir = data::prepare(root)?;
    let images = std::fs::read(dir.join("train-images.idx"))?;
    let labels = std::fs::read(dir.join("train-labels.idx"))?;
    let d = shoal_shared::dataset::Dataset::from_idx(&images, &labels, 10, &Default::default())?;
    Ok(Samples::from_dataset(&d))
}

/// Median samples/s of a trainer over `runs` runs of `steps` steps after `warm` steps.
fn samples_per_s(
    t: &mut Trainer<AnyBackend>,
    warm: usize,
    steps: usize,
    runs: usize,
) -> Result<f64> {
    t.run(warm)?;
    pollster::block_on(t.backend.loss())?;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        t.run(steps)?;
        pollster::block_on(t.backend.loss())?;
        rates.push((steps * BATCH) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

/// Steps of a run of about `secs` seconds, from two steps timed: 1 to `most`. Lavapipe,
/// the CPU emulation a machine without a GPU offers, trains the CNN at about 33 samples/s:
/// 50-step runs took its turn past 8 minutes for a figure that measures nothing.
fn steps_for(t: &mut Trainer<AnyBackend>, secs: f64, most: usize) -> Result<usize> {
    let start = Instant::now();
    t.run(2)?;
    pollster::block_on(t.backend.loss())?;
    let per_step = start.elapsed().as_secs_f64() / 2.0;
    Ok(((secs / per_step.max(1e-9)) as usize).clamp(1, most))
}

fn trainer(spec: ModelSpec, gpu: Option<&Gpu>, data: &Samples) -> Result<Trainer<AnyBackend>> {
    Ok(train::trainer(spec, gpu, data.clone(), BATCH, LR, 1)?)
}

fn models() -> [(&'static str, ModelSpec); 2] {
    [
        ("mlp", ModelSpec::mlp_digits()),
        ("cnn", ModelSpec::cnn_digits()),
    ]
}

/// Shoal's training throughput on the native wgpu adapter.
pub(crate) fn native_gpu_train(data: &Samples) -> Value {
    let gpu = match pollster::block_on(Gpu::new()) {
        Ok(g) => g,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let mut out = serde_json::Map::new();
    out.insert("adapter".into(), json!(gpu.adapter.description));
    for (name, spec) in models() {
        let rate = trainer(spec, Some(&gpu), data).and_then(|mut t| {
            let steps = steps_for(&mut t, 2.0, 50)?;
            samples_per_s(&mut t, 3, steps, 5)
        });
        match rate {
            Ok(r) => {
                println!(
                    "native wgpu ({}) {name}: {r:.0} samples/s",
                    gpu.adapter.description
                );
                out.insert(name.into(), json!(r));
            }
            Err(e) => {
                out.insert(name.into(), json!({ "error": format!("{e:#}") }));
            }
        }
    }
    Value::Object(out)
}

fn train_throughput(root: &Path) -> Result<Value> {
    let data = load_train(root)?;
    // Shoal and PyTorch take turns, `TURNS` times each, and each side's figure is the
    // median of its turns: this shared machine's speed drifts by 25% between runs, and
    // one measurement of each, a minute apart, swung the CNN's ratio from 0.88 to 1.24.
    let digits = root.join("data/digits").display().to_string();
    let mut trainers = Vec::new();
    for (name, spec) in models() {
        trainers.push((name, trainer(spec, None, &data)?));
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for turn in 0..TURNS {
        let mut shoal = serde_json::Map::new();
        for (name, t) in &mut trainers {
            let (warm, steps) = if *name == "mlp" { (20, 100) } else { (10, 30) };
            let r = samples_per_s(t, warm, steps, 5)?;
            println!("Shoal CPU native {name} (turn {turn}): {r:.0} samples/s");
            shoal.insert((*name).into(), json!(r));
        }
        ours.push(Value::Object(shoal));
        let torch = torch_bench(
            root,
            "xtask/bench/torch_train.py",
            std::slice::from_ref(&digits),
        )
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        println!("PyTorch CPU (1 thread, turn {turn}): {torch}");
        theirs.push(torch);
    }
    let medians = |runs: &[Value]| {
        let mut m = serde_json::Map::new();
        for (name, _) in models() {
            let xs: Vec<f64> = runs.iter().filter_map(|r| r[name].as_f64()).collect();
            if xs.len() == runs.len() {
                m.insert(name.into(), json!(median(xs)));
            }
        }
        m
    };
    let shoal = Value::Object(medians(&ours));
    // A failed turn stands for PyTorch's figures: its error, not a median of the rest.
    let torch = theirs
        .iter()
        .find(|r| r.get("error").is_some())
        .cloned()
        .unwrap_or_else(|| Value::Object(medians(&theirs)));
    println!("medians: Shoal {shoal}, PyTorch {torch}");
    let gpu = native_gpu_train(&data);
    let browser =
        browser_bench(root, "train").unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    println!("browser: {browser}");
    let b = |m: &str, who: &str, backend: &str| browser[m][format!("{who}_{backend}")].clone();
    let ratios = json!({
        "mlp-cpu": ratio(&b("mlp", "shoal", "cpu"), &b("mlp", "tfjs", "wasm")),
        "cnn-cpu": ratio(&b("cnn", "shoal", "cpu"), &b("cnn", "tfjs", "wasm")),
        "mlp-webgpu": ratio(&b("mlp", "shoal", "webgpu"), &b("mlp", "tfjs", "webgpu")),
        "cnn-webgpu": ratio(&b("cnn", "shoal", "webgpu"), &b("cnn", "tfjs", "webgpu")),
        "mlp-native": ratio(&shoal["mlp"], &torch["mlp"]),
        "cnn-native": ratio(&shoal["cnn"], &torch["cnn"]),
    });
    Ok(json!({
        "ratios": ratios,
        "batch": BATCH,
        "unit": "training samples per second (median)",
        "native_cpu": { "shoal": shoal, "pytorch": torch, "threads": 1, "turns": { "shoal": ours, "pytorch": theirs } },
        "native_gpu": gpu,
        "browser": browser,
    }))
}

/// The demo language model's task (`tasks/fortunes.toml`).
fn fortunes_task(root: &Path) -> Result<shoal_shared::task::TaskSpec> {
    let text = std::fs::read_to_string(root.join("tasks/fortunes.toml"))?;
    Ok(shoal_shared::task::TaskSpec::from_toml(&text)?)
}

/// `train-lm`: training tokens/s of the demo language model (`tasks/fortunes.toml`) at
/// its batch and context with its AdamW recipe, Shoal's CPU backend natively against
/// PyTorch on the CPU, both on one thread (Shoal's CPU backend uses one).
fn train_lm(root: &Path) -> Result<Value> {
    let corpus = crate::text::prepare(root)?;
    let task = fortunes_task(root)?;
    let model = shoal_shared::engine::Model::new(task.model.clone())?;
    let bytes = std::fs::read(&corpus)?;
    let ctx = model.positions();
    let data = Samples::from_dataset(&shoal_shared::dataset::Dataset::from_text(&bytes, ctx)?);
    let batch = task.train.batch;
    let opt = task.optimizer_at(0).map_err(anyhow::Error::msg)?;
    let tokens_per_s = |gpu: Option<&Gpu>, steps: usize| -> Result<f64> {
        let backend = train::backend(model.clone(), gpu, opt, model.init_params(1), batch)?;
        let mut t = Trainer::new(backend, data.clone(), batch, 1)?;
        t.run(3)?;
        pollster::block_on(t.backend.loss())?;
        let mut rates = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            t.run(steps)?;
            pollster::block_on(t.backend.loss())?;
            rates.push((steps * batch * ctx) as f64 / start.elapsed().as_secs_f64());
        }
        Ok(median(rates))
    };
    let shoal = tokens_per_s(None, 20)?;
    println!(
        "Shoal CPU native, demo LM ({} parameters, batch {batch}, context {ctx}): {shoal:.0} tokens/s",
        model.param_len()
    );
    let (blocks, dim, heads) = lm_shape(&task.model);
    let torch = torch_bench(
        root,
        "xtask/bench/torch_lm.py",
        &[
            corpus.display().to_string(),
            ctx.to_string(),
            dim.to_string(),
            blocks.to_string(),
            heads.to_string(),
            batch.to_string(),
        ],
    )
    .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    println!("PyTorch CPU (1 thread): {torch}");
    let gpu = match pollster::block_on(Gpu::new()) {
        Ok(g) => match tokens_per_s(Some(&g), 5) {
            Ok(r) => {
                println!(
                    "Shoal native wgpu ({}): {r:.0} tokens/s",
                    g.adapter.description
                );
                json!({ "adapter": g.adapter.description, "tokens_per_s": r })
            }
            Err(e) => json!({ "error": format!("{e:#}") }),
        },
        Err(e) => json!({ "error": e.to_string() }),
    };
    let browser =
        browser_bench(root, "lm").unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    println!("browser (Chromium, wasm CPU and WebGPU): {browser}");
    Ok(json!({
        "ratios": { "lm-native": ratio(&json!(shoal), &torch["tokens_per_s"]) },
        "native_gpu": gpu,
        "browser": browser,
        "unit": "training tokens per second (median of 5 runs of 20 steps)",
        "model": { "parameters": model.param_len(), "blocks": blocks, "dim": dim, "heads": heads,
                   "context": ctx, "batch": batch },
        "native_cpu": { "shoal": shoal, "pytorch": torch, "threads": 1 },
        "not_measured": "PyTorch on a GPU (lm-gpu): only where a GPU machine is lent",
    }))
}

/// Blocks, width and heads of a language model description.
fn lm_shape(spec: &ModelSpec) -> (usize, usize, usize) {
    use shoal_shared::engine::LayerSpec;
    let (mut blocks, mut dim, mut heads) = (0, 0, 0);
    for l in &spec.layers {
        match *l {
            LayerSpec::Embedding { dim: d, .. } => dim = d,
            LayerSpec::TransformerBlock { heads: h, .. } => {
                blocks += 1;
                heads = h;
            }
            _ => {}
        }
    }
    (blocks, dim, heads)
}

/// PyTorch on the CPU with one thread, installed on demand into target/bench/venv:
/// runs `script` with `args` and reads the JSON of its last line.
fn torch_bench(root: &Path, script: &str, args: &[String]) -> Result<Value> {
    let venv = root.join("target/bench/venv");
    let python = venv.join("bin/python");
    let has_torch = |p: &Path| {
        Command::new(p)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_torch(&python) {
        eprintln!(
            "xtask: installing PyTorch from PyPI into {} (large, once)",
            venv.display()
        );
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_cmd(Command::new(venv.join("bin/pip")).args(["install", "-q", "torch"]))?;
    }
    let out = Command::new(&python)
        .arg(root.join(script))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("running the PyTorch benchmark")?;
    if !out.status.success() {
        bail!(
            "PyTorch benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

/// Runs the browser half of a benchmark: Shoal's bundle and TF.js in one headless
/// Chromium page, inside a loopback-only network namespace.
fn browser_bench(root: &Path, kind: &str) -> Result<Value> {
    setup::ensure_debs(&setup::TEST_PACKAGES)?;
    setup::ensure_bench_web(root)?;
    web::build(root)?;
    data::prepare(root)?;
    // The demo LM's task as the browser gets tasks: JSON (the wasm carries no TOML parser).
    if kind == "lm" {
        let task = fortunes_task(root)?;
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("fortunes.task.json"), serde_json::to_vec(&task)?)?;
    }
    json_in_namespace(
        root,
        &format!("node xtask/bench-web/bench.mjs {kind}"),
        "browser benchmark",
    )
}

/// Runs a command inside a loopback-only network namespace; its last stdout line is JSON.
fn json_in_namespace(root: &Path, script: &str, what: &str) -> Result<Value> {
    let out = crate::test::loopback_namespace(script)
        .current_dir(root)
        .output()
        .with_context(|| format!("running the {what}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

fn datachannel(root: &Path) -> Result<Value> {
    setup::ensure_debs(&setup::TEST_PACKAGES)?;
    setup::ensure_bench_web(root)?;
    web::build(root)?;
    data::prepare(root)?;
    crate::build_server_with(root, &["--example", "datachannel_bench"])?;
    println!(
        "datachannel: 20 MB; median MB/s of 15 native and 5 browser transfers each (loopback)"
    );
    let native = json_in_namespace(
        root,
        "target/release/examples/datachannel_bench",
        "native datachannel benchmark",
    )?;
    let browser = json_in_namespace(
        root,
        "node xtask/bench-web/datachannel.mjs",
        "browser datachannel benchmark",
    )?;
    let med = |v: &Value, k: &str| {
        median(
            v[k].as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default(),
        )
    };
    let mut report = json!({});
    let mut ratios = serde_json::Map::new();
    for (name, v) in [("native", &native), ("browser", &browser)] {
        let (raw, framed) = (med(v, "raw_mb_s"), med(v, "framed_mb_s"));
        println!(
            "  {name:<8} raw {raw:>8.1} MB/s   framed {framed:>8.1} MB/s   ratio {:.2}",
            framed / raw
        );
        report[name] = json!({ "raw_mb_s": raw, "framed_mb_s": framed, "trials": v });
        ratios.insert(format!("framing-vs-raw-{name}"), json!(framed / raw));
    }
    report["ratios"] = Value::Object(ratios);
    Ok(report)
}

fn swarm(root: &Path) -> Result<Value> {
    setup::ensure_debs(&setup::TEST_PACKAGES)?;
    setup::ensure_bench_web(root)?;
    web::build(root)?;
    data::prepare(root)?;
    crate::build_server_with(root, &["--bin", "shoal-peer"])?;
    let secs = std::env::var("SHOAL_BENCH_SECONDS").unwrap_or_else(|_| "150".into());
    println!(
        "swarm: 3 native peers and 2 contributor pages (Chromium, CPU), {secs} s alone (each its own server) then {secs} s together"
    );
    let v = json_in_namespace(root, "node xtask/bench-web/swarm.mjs", "swarm benchmark")?;
    let f = |x: &Value| x.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let r = |x: &Value| x.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    let mb = |x: &Value| x.as_f64().map_or("-".into(), |b| format!("{:.0}", b / 1e6));
    println!(
        "  solo  {:>9} samples/s in all   time to {} {:>6} s",
        f(&v["solo_samples_per_s"]),
        v["target"],
        f(&v["solo_time_to_target_s"])
    );
    println!(
        "  swarm {:>9} samples/s in all   time to {} {:>6} s   {} MB up per peer-hour",
        f(&v["swarm_samples_per_s"]),
        v["target"],
        f(&v["swarm_time_to_target_s"]),
        mb(&v["swarm_bytes_up_per_hour"])
    );
    println!(
        "  pages {:>9} samples/s alone, {:>9} together   {} MB up per page-hour",
        f(&v["browser_solo_samples_per_s"]),
        f(&v["browser_swarm_samples_per_s"]),
        mb(&v["browser_bytes_up_per_hour"])
    );
    println!(
        "  swarm-utilization {} (pages {})   time-to-target {}",
        r(&v["ratios"]["swarm-utilization"]),
        r(&v["ratios"]["swarm-utilization-browser"]),
        r(&v["ratios"]["time-to-target"])
    );
    Ok(v)
}

/// `xtask bench-native-gpu`: the native wgpu numbers alone (matmul and training), for a
/// GPU machine that has this binary and the demo data but no toolchain.
pub(crate) fn native_gpu() -> Result<()> {
    let data = load_train(&std::env::current_dir()?)?;
    let report = json!({ "matmul": native_gpu_matmul(), "train": native_gpu_train(&data) });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
