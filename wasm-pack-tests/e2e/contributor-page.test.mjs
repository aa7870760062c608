// The contributor page in headless Chromium: served by the real server, the wasm module
// starts in a Web Worker, finds the WebGPU adapter and proves it with a compute kernel.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  assert.equal(await server?.stop(), 0, 'server shuts down cleanly on SIGTERM');
});

test('server answers health checks and serves the bundle with the right MIME types', async () => {
  const health = await fetch(`${server.url}/healthz`);
  assert.equal(health.status, 200);
  const wasm = await fetch(`${server.url}/pkg/shoal_web_client_bg.wasm`);
  assert.equal(wasm.status, 200);
  assert.equal(wasm.headers.get('content-type'), 'application/wasm');
  const js = await fetch(`${server.url}/pkg/shoal_web_client.js`, { headers: { 'accept-encoding': 'gzip' } });
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  assert.equal(js.headers.get('content-encoding'), 'gzip');
  const html = await fetch(`${server.url}/`);
  assert.match(html.headers.get('content-type'), /^text\/html/);
  assert.equal((await fetch(`${server.url}/no-such-file.js`)).status, 404);
});

test('the demo data is served as IDX files', async () => {
  const res = await fetch(`${server.url}/data/digits/test-labels.idx`);
  assert.equal(res.status, 200);
  const bytes = new Uint8Array(await res.arrayBuffer());
  assert.deepEqual([...bytes.slice(0, 4)], [0, 0, 8, 1]);
  assert.equal(new DataView(bytes.buffer).getUint32(4), 2000);
});

test('the contributor page shows the WebGPU adapter found by the worker', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(server.url);
  const backend = page.locator('#backend');
  await page.waitForFunction(() => document.getElementById('backend').dataset.state !== 'probing',
    null, { timeout: 60_000 });
  assert.equal(await backend.getAttribute('data-state'), 'gpu', await page.locator('#detail').textContent());
  const text = await backend.textContent();
  assert.match(text, /^WebGPU: /);
  assert.match(text.toLowerCase(), /swiftshader|software/, 'headless Chromium reports its software adapter');
  assert.match(await page.locator('#detail').textContent(), /compute check: ok\./);
  assert.deepEqual(errors, []);
  await page.close();
});

test('without WebGPU the page says it will train on the CPU', async () => {
  const page = await browser.newPage();
  // Hide WebGPU from the worker before any script runs, as in a browser without it.
  await page.route('**/worker.js', async (route) => {
    const res = await route.fetch();
    const body = `Object.defineProperty(WorkerNavigator.prototype, 'gpu', { get: () => undefined });\n${await res.text()}`;
    await route.fulfill({ response: res, body });
  });
  await page.goto(server.url);
  await page.waitForFunction(() => document.getElementById('backend').dataset.state !== 'probing',
    null, { timeout: 60_000 });
  assert.equal(await page.locator('#backend').getAttribute('data-state'), 'cpu');
  assert.match(await page.locator('#backend').textContent(), /train on your CPU/);
  await page.close();
});
