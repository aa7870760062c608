// The browser half of `cargo xtask bench`: Shoal's bundle and TensorFlow.js 4.22 in one
// headless Chromium page, on the same data, batch and optimizer. Prints progress to
// stderr and one JSON line of medians to stdout.
//
//   node xtask/bench-web/bench.mjs matmul|train|lm
//
// Files are served from disk by request interception on http://localhost (a secure
// context, so WebGPU is exposed); nothing goes to the network.
import { readFile } from 'node:fs/promises';
import { extname, join, normalize } from 'node:path';
import { chromium } from 'playwright-core';

const root = new URL('../..', import.meta.url).pathname;
const here = new URL('.', import.meta.url).pathname;
const kind = process.argv[2];
const ORIGIN = 'http://localhost:9';

const mounts = {
  '/pkg/': join(root, 'www/pkg'),
  '/data/': join(root, 'data'),
  '/tasks/': join(root, 'tasks'),
  '/bench/': join(root, 'target/bench'),
  '/tfjs/': join(here, 'node_modules/@tensorflow/tfjs/dist'),
  '/tfjs-wasm/': join(here, 'node_modules/@tensorflow/tfjs-backend-wasm/dist'),
  '/tfjs-webgpu/': join(here, 'node_modules/@tensorflow/tfjs-backend-webgpu/dist'),
};
const types = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html', '.idx': 'application/octet-stream' };
const page_html = `<!doctype html><meta charset="utf-8"><title>Shoal bench</title>
<script src="/tfjs/tf.min.js"></script>
<script src="/tfjs-wasm/tf-backend-wasm.min.js"></script>
<script src="/tfjs-webgpu/tf-backend-webgpu.min.js"></script>`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--enable-unsafe-webgpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage'],
});
const page = await browser.newPage();
page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
await page.route('**/*', async (route) => {
  const url = new URL(route.request().url());
  if (url.origin !== ORIGIN) return route.abort();
  if (url.pathname === '/') return route.fulfill({ body: page_html, contentType: 'text/html' });
  for (const [prefix, dir] of Object.entries(mounts)) {
    if (url.pathname.startsWith(prefix)) {
      const file = normalize(join(dir, url.pathname.slice(prefix.length)));
      if (!file.startsWith(dir)) return route.fulfill({ status: 403 });
      try {
        const body = await readFile(file);
        return route.fulfill({ body, contentType: types[extname(file)] ?? 'application/octet-stream' });
      } catch {
        return route.fulfill({ status: 404 });
      }
    }
  }
  return route.fulfill({ status: 404 });
});
await page.goto(`${ORIGIN}/`);

const result = await page.evaluate(async ({ kind }) => {
  const log = (s) => console.log(s);
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const shoal = await import('/pkg/shoal_web_client.js');
  await shoal.default();
  tf.wasm.setWasmPaths('/tfjs-wasm/');
  const out = {};

  if (kind === 'matmul') {
    for (const n of [256, 512]) {
      const reps = 1;
      const runs = 3;
      const flop = 2 * n ** 3 * reps;
      const m = await shoal.MatmulBench.create(n);
      m.run(1); await m.sync();
      const shoalRates = [];
      for (let r = 0; r < runs; r++) {
        const t0 = performance.now(); m.run(reps); await m.sync();
        shoalRates.push(flop / ((performance.now() - t0) / 1000) / 1e9);
      }
      await tf.setBackend('webgpu'); await tf.ready();
      const a = tf.randomNormal([n, n]); const b = tf.randomNormal([n, n]);
      const warm = tf.matMul(a, b); await warm.data(); warm.dispose();
      const tfRates = [];
      for (let r = 0; r < runs; r++) {
        const t0 = performance.now();
        let c = null;
        for (let i = 0; i < reps; i++) { c?.dispose(); c = tf.matMul(a, b); }
        await c.data(); c.dispose();
        tfRates.push(flop / ((performance.now() - t0) / 1000) / 1e9);
      }
      a.dispose(); b.dispose();
      out[n] = { shoal_gflops: median(shoalRates), tfjs_gflops: median(tfRates) };
      log(`matmul ${n}: Shoal ${out[n].shoal_gflops.toFixed(3)} GFLOP/s, TF.js ${out[n].tfjs_gflops.toFixed(3)} GFLOP/s`);
    }
    return out;
  }

  if (kind === 'lm') {
    // The demo language model (tasks/fortunes.toml, as JSON: the browser reads no TOML) on
    // its own data, batch and AdamW: training tokens per second on Shoal's wasm CPU backend
    // and its WebGPU backend, and the module's linear memory (its peak: wasm memory only
    // grows) after the CPU run.
    const taskJson = await (await fetch('/bench/fortunes.task.json')).text();
    const text = new Uint8Array(await (await fetch('/data/text/fortunes.txt')).arrayBuffer());
    const plan = { cpu: [2, 5, 3], webgpu: [1, 1, 2] };
    for (const backend of ['cpu', 'webgpu']) {
      const before = shoal.wasmMemoryBytes();
      try {
        const [warm, steps, runs] = plan[backend];
        const t = await shoal.BenchTrainer.task(taskJson, backend, [text]);
        const tokens = t.predictionsPerStep();
        t.run(warm); await t.loss();
        const rates = [];
        for (let r = 0; r < runs; r++) {
          const t0 = performance.now(); t.run(steps); await t.loss();
          rates.push(steps * tokens / ((performance.now() - t0) / 1000));
        }
        out[backend] = { tokens_per_s: median(rates), ran_on: t.backend(), wasm_memory_before: before,
          wasm_memory_after: shoal.wasmMemoryBytes() };
        t.free();
      } catch (e) {
        out[backend] = { error: String(e) };
      }
      log(`lm ${backend}: ${JSON.stringify(out[backend])}`);
    }
    return out;
  }

  const images = new Uint8Array(await (await fetch('/data/digits/train-images.idx')).arrayBuffer());
  const labels = new Uint8Array(await (await fetch('/data/digits/train-labels.idx')).arrayBuffer());
  const n = labels.length - 8;
  const BATCH = 64;
  const plan = {
    cpu: { mlp: [10, 60, 5], cnn: [5, 20, 5] },
    webgpu: { mlp: [3, 10, 3], cnn: [2, 4, 3] },
  };

  async function shoalRate(model, backend) {
    const [warm, steps, runs] = plan[backend][model];
    const t = await shoal.BenchTrainer.digits(model, backend, images, labels, BATCH, 1e-3);
    t.run(warm); await t.loss();
    const rates = [];
    for (let r = 0; r < runs; r++) {
      const t0 = performance.now(); t.run(steps); await t.loss();
      rates.push(steps * BATCH / ((performance.now() - t0) / 1000));
    }
    t.free();
    return median(rates);
  }

  function tfModel(model) {
    const m = tf.sequential();
    if (model === 'mlp') {
      m.add(tf.layers.flatten({ inputShape: [28, 28, 1] }));
      m.add(tf.layers.dense({ units: 128, activation: 'relu' }));
      m.add(tf.layers.dense({ units: 64, activation: 'relu' }));
      m.add(tf.layers.dense({ units: 10 }));
    } else {
      m.add(tf.layers.conv2d({ inputShape: [28, 28, 1], filters: 8, kernelSize: 3, padding: 'same', activation: 'relu' }));
      m.add(tf.layers.maxPooling2d({ poolSize: 2 }));
      m.add(tf.layers.conv2d({ filters: 16, kernelSize: 3, padding: 'same', activation: 'relu' }));
      m.add(tf.layers.maxPooling2d({ poolSize: 2 }));
      m.add(tf.layers.flatten());
      m.add(tf.layers.dense({ units: 10 }));
    }
    return m;
  }

  async function tfRate(model, backend, planKey) {
    const [warm, steps, runs] = plan[planKey][model];
    await tf.setBackend(backend); await tf.ready();
    const pixels = new Float32Array(n * 784);
    for (let i = 0; i < pixels.length; i++) pixels[i] = images[16 + i] / 255;
    const xs = tf.tensor4d(pixels, [n, 28, 28, 1]);
    const ys = tf.oneHot(tf.tensor1d(Array.from(labels.subarray(8)), 'int32'), 10);
    const m = tfModel(model);
    const opt = tf.train.adam(1e-3);
    let cursor = 0;
    const run = async (k) => {
      let cost = null;
      for (let i = 0; i < k; i++) {
        if (cursor + BATCH > n) cursor = 0;
        const off = cursor; cursor += BATCH;
        cost?.dispose();
        cost = tf.tidy(() => {
          const xb = xs.slice([off, 0, 0, 0], [BATCH, 28, 28, 1]);
          const yb = ys.slice([off, 0], [BATCH, 10]);
          return opt.minimize(() => tf.losses.softmaxCrossEntropy(yb, m.apply(xb)), true);
        });
      }
      await cost.data(); cost.dispose();
    };
    await run(warm);
    const rates = [];
    for (let r = 0; r < runs; r++) {
      const t0 = performance.now(); await run(steps);
      rates.push(steps * BATCH / ((performance.now() - t0) / 1000));
    }
    xs.dispose(); ys.dispose(); m.dispose(); opt.dispose();
    return median(rates);
  }

  // A framework that cannot run a configuration is recorded with its error, not skipped.
  const attempt = async (f) => {
    try { return await f(); } catch (e) { return { error: String(e?.message ?? e) }; }
  };
  for (const model of ['mlp', 'cnn']) {
    out[model] = {
      shoal_cpu: await attempt(() => shoalRate(model, 'cpu')),
      tfjs_wasm: await attempt(() => tfRate(model, 'wasm', 'cpu')),
      shoal_webgpu: await attempt(() => shoalRate(model, 'webgpu')),
      tfjs_webgpu: await attempt(() => tfRate(model, 'webgpu', 'webgpu')),
    };
    log(`${model}: ${JSON.stringify(out[model])}`);
  }
  out.adapter = (await navigator.gpu?.requestAdapter())?.info?.description || 'none';
  out.tfjs_wasm_simd = await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT');
  out.tfjs_wasm_threads = await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT');
  return out;
}, { kind });

await browser.close();
console.log(JSON.stringify(result));
