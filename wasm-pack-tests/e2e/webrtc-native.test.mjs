// Browser to native over real WebRTC: a headless Chromium page and the native peer
// binary (`shoal-peer --echo`, on the `webrtc` crate) meet through the real signaling
// server. The page sends 10 MB; the native peer checks it arrived whole (its SHA-256)
// and sends it back; the page checks the echo's SHA-256. Both directions, one test. A
// page that opens a data channel of its own beside Shoal's is dropped by the native peer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import {
  startServer, launchBrowser, webrtcPage, joinSwarm, firstPeer, recordConnections, openChannelsOfItsOwn, peerDown,
} from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const peerBin = process.env.SHOAL_PEER_BIN ?? join(root, 'target/release/shoal-peer');

let server;
let browser;
let native;
let nativeOut = '';

before(async () => {
  server = await startServer();
  native = spawn(peerBin, ['--server', server.url.replace('http://', 'ws://'), '--task', 'digits',
    '--bind', '127.0.0.1', '--echo'], { stdio: ['ignore', 'pipe', 'inherit'] });
  native.stdout.on('data', (d) => { nativeOut += d; });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  if (native && native.exitCode === null) {
    native.kill('SIGINT');
    await once(native, 'exit');
  }
  await server?.stop();
});

test('a browser and a native peer exchange 10 MB both ways', async () => {
  const page = await webrtcPage(browser, server.url);
  await joinSwarm(page, server.ws);
  const nativeId = await firstPeer(page);
  assert.match(nativeOut, new RegExp(`^up ${nativeId}$`, 'm'), 'the page is connected to the native peer');
  const sent = await page.evaluate(async (peer) => {
    const data = new Uint8Array(10 * 1024 * 1024);
    for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
    const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');
    const hash = hex(await crypto.subtle.digest('SHA-256', data));
    window.swarm.send(peer, data);
    return hash;
  }, nativeId);
  await page.waitForFunction(() => window.shoalEvents.some((e) => e.type === 'message'), null,
    { timeout: 120_000, polling: 200 });
  const echoed = await page.evaluate(async () => {
    const m = window.shoalEvents.find((e) => e.type === 'message');
    const d = new Uint8Array(await crypto.subtle.digest('SHA-256', m.data));
    return { from: m.from, length: m.data.length, hash: Array.from(d, (x) => x.toString(16).padStart(2, '0')).join('') };
  });
  assert.match(nativeOut, new RegExp(`^message \\S+ ${10 * 1024 * 1024} ${sent}$`, 'm'), 'native received it intact');
  assert.equal(echoed.from, nativeId);
  assert.equal(echoed.length, 10 * 1024 * 1024);
  assert.equal(echoed.hash, sent, 'the echo came back intact');
  await page.context().close();
});

test('a neighbour that opens a data channel of its own is dropped by a native peer', async () => {
  // Shoal's one channel is negotiated (id 0). The `webrtc` crate announces a channel the
  // other side opens, and holds up to 256 of its messages that nobody reads for the
  // connection's life: the native peer drops such a neighbour.
  const page = await webrtcPage(browser, server.url);
  try {
    await recordConnections(page);
    await joinSwarm(page, server.ws);
    const nativeId = await firstPeer(page);
    assert.equal(await openChannelsOfItsOwn(page), 1, 'the page is connected to the native peer alone');
    await peerDown(page, nativeId);
    assert.equal(native.exitCode, null, 'the native peer runs on');
  } finally {
    await page.context().close();
  }
});
