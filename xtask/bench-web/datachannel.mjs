// The browser half of `cargo xtask bench datachannel`: a 20 MB message between two peers
// in one headless Chromium page, through Shoal's framing layer (two `Swarm`s introduced
// by the real signaling server: chunking, CRC-32, reassembly, bufferedAmount
// backpressure, all in wasm) and as raw 16 KiB sends on a plain RTCDataChannel of the
// same kind (reliable, ordered; the same high/low water marks; the receiver only counts
// bytes). Runs inside a loopback-only network namespace. Prints one JSON line.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { launchWebrtcBrowser } from './chromium.mjs';

const root = new URL('../..', import.meta.url).pathname;
const serverBin = process.env.SHOAL_SERVER_BIN ?? join(root, 'target/release/shoal-signaling-server');
const SIZE = 20 << 20;
const TRIALS = 5;

const server = spawn(serverBin, ['--bind', '127.0.0.1', '--port', '0', '--www', join(root, 'www'),
  '--data', join(root, 'data'), '--task-file', join(root, 'tasks/digits.toml')], { stdio: ['ignore', 'pipe', 'inherit'] });
const url = await new Promise((resolve, reject) => {
  let out = '';
  server.stdout.on('data', (d) => {
    out += d;
    const m = out.match(/listening on (http:\/\/[0-9.:]+)/);
    if (m) resolve(m[1]);
  });
  server.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
});

const browser = await launchWebrtcBrowser();
try {
  const context = await browser.newContext();
  // Chromium gathers loopback candidates only with a media permission (a harness need).
  await context.grantPermissions(['microphone', 'camera']);
  const page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(`${url}/healthz`);
  const result = await page.evaluate(async ({ ws, size, trials }) => {
    const shoal = await import('/pkg/shoal_web_client.js');
    await shoal.default();
    const data = new Uint8Array(size);
    for (let i = 0; i < size; i++) data[i] = (i * 31) % 251;
    const HIGH = 1 << 20;
    const LOW = 256 << 10;
    const CHUNK = 16 << 10;

    // Raw: two RTCPeerConnections, one pre-negotiated channel, 16 KiB sends.
    const a = new RTCPeerConnection();
    const b = new RTCPeerConnection();
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const da = a.createDataChannel('raw', { negotiated: true, id: 0 });
    const db = b.createDataChannel('raw', { negotiated: true, id: 0 });
    da.binaryType = 'arraybuffer';
    db.binaryType = 'arraybuffer';
    da.bufferedAmountLowThreshold = LOW;
    await a.setLocalDescription();
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription();
    await a.setRemoteDescription(b.localDescription);
    const opened = (c) => (c.readyState === 'open' ? null : new Promise((r) => { c.onopen = r; }));
    await Promise.all([opened(da), opened(db)]);
    async function raw() {
      let got = 0;
      const done = new Promise((resolve) => {
        db.onmessage = (e) => {
          got += e.data.byteLength;
          if (got >= size) resolve();
        };
      });
      const t0 = performance.now();
      for (let off = 0; off < size; off += CHUNK) {
        if (da.bufferedAmount >= HIGH) await new Promise((r) => { da.onbufferedamountlow = r; });
        da.send(data.subarray(off, off + CHUNK));
      }
      await done;
      return size / 1e6 / ((performance.now() - t0) / 1000);
    }

    // Framed: two Swarms in this page, introduced by the server.
    const s1 = shoal.Swarm.connect(ws);
    const s2 = shoal.Swarm.connect(ws);
    let waiting = null;
    (async () => {
      for (;;) {
        const e = await s2.next();
        if (e.type === 'message' && waiting) waiting(e.data.length);
      }
    })();
    (async () => { for (;;) await s1.next(); })();
    for (let i = 0; i < 600 && !(s1.peers().length && s2.peers().length); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    if (!s1.peers().length) throw new Error('the two swarm peers never connected');
    async function framed() {
      const done = new Promise((resolve) => { waiting = resolve; });
      const t0 = performance.now();
      s1.send(s2.id(), data);
      const got = await done;
      if (got !== size) throw new Error(`received ${got} bytes`);
      return size / 1e6 / ((performance.now() - t0) / 1000);
    }

    const out = { raw_mb_s: [], framed_mb_s: [] };
    // ABBA order, so that neither kind always runs first.
    for (let t = 0; t < trials; t++) {
      if (t % 2 === 0) {
        out.raw_mb_s.push(await raw());
        out.framed_mb_s.push(await framed());
      } else {
        out.framed_mb_s.push(await framed());
        out.raw_mb_s.push(await raw());
      }
    }
    s1.close();
    s2.close();
    a.close();
    b.close();
    return out;
  }, { ws: `${url.replace('http://', 'ws://')}/ws/digits?v=2`, size: SIZE, trials: TRIALS });
  console.log(JSON.stringify({ bytes: SIZE, ...result }));
} finally {
  await browser.close();
  server.kill('SIGTERM');
}
