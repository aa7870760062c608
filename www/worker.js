// Shoal's Web Worker: loads the wasm module and runs everything heavy off the main thread:
// the WebGPU probe, then (after the visitor's consent) the swarm peer's training loop. The
// WebRTC connections live on the page's main thread (browsers have none in workers).
import init, { probe, SwarmPeer } from './pkg/shoal_web_client.js';

let backend = 'cpu';
let peer = null;
// Transport events that arrive while the peer is still being created.
let early = [];

async function main() {
  try {
    await init();
    const result = JSON.parse(await probe());
    backend = result.backend === 'gpu' && result.check === 'ok' ? 'webgpu' : 'cpu';
    self.postMessage({ type: 'probe', result });
  } catch (e) {
    self.postMessage({ type: 'error', message: String(e && e.message ? e.message : e) });
  }
}

async function fetchBytes(path) {
  const r = await fetch(new URL(path, self.location.origin));
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Joins the swarm and trains until the page says stop. Each tick either trains one
// round, closes one, or finds nothing to do (then the worker sleeps briefly).
async function contribute(task, secret) {
  const [trainImages, trainLabels, testImages, testLabels] = await Promise.all([
    fetchBytes(`/data/${task}/train-images.idx`),
    fetchBytes(`/data/${task}/train-labels.idx`),
    fetchBytes(`/data/${task}/test-images.idx`),
    fetchBytes(`/data/${task}/test-labels.idx`),
  ]);
  peer = await SwarmPeer.create(backend, secret, trainImages, trainLabels, testImages, testLabels);
  for (const m of early) peer.event(m.kind, m.peer, m.data);
  early = [];
  self.postMessage({ type: 'joined', key: peer.publicKey(), backend });
  while (peer) {
    const p = JSON.parse(await peer.tick());
    // WebRTC lives on the page's main thread: hand it what to send.
    for (const [to, data] of peer.outgoing()) {
      self.postMessage({ type: 'send', peer: to, data }, [data.buffer]);
    }
    self.postMessage({ type: 'progress', progress: p });
    if (!p.closed && p.phase !== 'training') await pause(25);
  }
}

self.addEventListener('message', (event) => {
  const msg = event.data;
  if (msg.type === 'start' && !peer) {
    if (msg.backend === 'cpu') backend = 'cpu';
    contribute(msg.task, msg.secret).catch((e) => {
      peer = null;
      self.postMessage({ type: 'error', message: String(e && e.message ? e.message : e) });
    });
  } else if (msg.type === 'net' && !peer) {
    early.push(msg);
  } else if (msg.type === 'net') {
    // A transport event from the page's swarm connection.
    try {
      peer.event(msg.kind, msg.peer, msg.data);
    } catch (e) {
      self.postMessage({ type: 'error', message: String(e && e.message ? e.message : e) });
    }
  } else if (msg.type === 'stop') {
    peer = null;
  }
});

main();
