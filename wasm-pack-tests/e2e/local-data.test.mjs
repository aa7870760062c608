// Visitors' own data: a task with `[data] source = "local"`. Two visitors each choose
// PNG files (MNIST digits this test writes, each carrying a secret marker in a text chunk;
// one also in its pixels, one in its file name, so in labels.csv) and a labels.csv with
// the page's file picker; bad files among them are named and
// skipped; the page shows a summary before consent; the two train together over WebRTC
// and the model learns (held-out accuracy on the server's test split). Everything the
// pages send — HTTP request bodies, websocket frames and data channel messages — is
// searched for the marker: no byte of the files leaves the browser; model updates do.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { deflateSync } from 'node:zlib';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, tempDir, pressConsent } from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const MARKER = `SHOAL-PRIVATE-${Math.random().toString(36).slice(2)}-MARKER`;
const PER_VISITOR = 400;
const TARGET = 0.8;

let server;
let browser;

before(async () => {
  const dir = tempDir('shoal-local-');
  const taskFile = join(dir, 'mine.toml');
  const demo = readFileSync(join(root, 'tasks/digits.toml'), 'utf8');
  const local = demo
    .replace('name = "digits"', 'name = "mine"')
    .replace(/\[data\.train\]\nimages = "[^"]+"\nlabels = "[^"]+"\n/, '')
    .replace('[data]\nclasses = 10\n', '[data]\nclasses = 10\nsource = "local"\n\n[data.local]\nkind = "images"\nmax_file_bytes = 20000\n');
  assert.match(local, /source = "local"/);
  assert.doesNotMatch(local, /train-images/);
  writeFileSync(taskFile, local);
  server = await startServer(['--task-file', taskFile]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

// A PNG writer: grey 8-bit, one tEXt chunk.
const CRC = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}
function png(pixels, w, h) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(w, 0);
  header.writeUInt32BE(h, 4);
  header[8] = 8; // bit depth
  header[9] = 0; // grey
  const rows = Buffer.alloc(h * (w + 1));
  for (let y = 0; y < h; y++) pixels.copy(rows, y * (w + 1) + 1, y * w, (y + 1) * w);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('tEXt', Buffer.from(`Comment\0${MARKER}`, 'latin1')),
    chunk('IDAT', deflateSync(rows)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** The files visitor `v` chooses: digits `v*PER_VISITOR ..` of the demo's training split as
 *  PNGs, their labels.csv, and five bad files. */
function filesOf(v) {
  const images = readFileSync(join(root, 'data/digits/train-images.idx'));
  const labels = readFileSync(join(root, 'data/digits/train-labels.idx'));
  const files = [];
  const csv = ['file,label'];
  for (let i = v * PER_VISITOR; i < (v + 1) * PER_VISITOR; i++) {
    const first = i === v * PER_VISITOR;
    // The first digit's file is named with the marker, and its top row (blank in MNIST)
    // holds the marker as grey values: the decoded pixels carry it too.
    const name = first ? `${MARKER}-${v}.png` : `digit-${v}-${i}.png`;
    const pixels = Buffer.from(images.subarray(16 + i * 784, 16 + (i + 1) * 784));
    if (first) pixels.write(MARKER.slice(0, 28), 0, 'latin1');
    files.push({ name, mimeType: 'image/png', buffer: png(pixels, 28, 28) });
    csv.push(`${name},${labels[8 + i]}`);
  }
  const one = png(images.subarray(16, 16 + 784), 28, 28);
  files.push({ name: 'unlabelled.png', mimeType: 'image/png', buffer: one });
  files.push({ name: 'eleven.png', mimeType: 'image/png', buffer: one });
  csv.push('eleven.png,11');
  files.push({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from(`my notes ${MARKER}`) });
  files.push({ name: 'broken.png', mimeType: 'image/png', buffer: Buffer.from(`not really a PNG ${MARKER}`) });
  files.push({ name: 'huge.png', mimeType: 'image/png', buffer: Buffer.concat([one, Buffer.alloc(30_000)]) });
  // A JPEG whose frame (30000x30000) follows a fill byte: decoders skip it, and so must
  // the size check (reading it as a length it jumped past the frame).
  files.push({ name: 'filled.jpg', mimeType: 'image/jpeg', buffer: Buffer.from([0xff, 0xd8, 0xff, 0xff, 0xc0, 0x00, 0x0b, 0x08,
    0x75, 0x30, 0x75, 0x30, 0x01, 0x01, 0x11, 0x00, 0xff, 0xd9]) });
  files.push({ name: 'labels.csv', mimeType: 'text/csv', buffer: Buffer.from(`${csv.join('\n')}\n`) });
  return files;
}

/** Records, in the page, whether any byte sequence it sends over a data channel or a
 *  websocket holds the marker (searching across message boundaries), and how much it
 *  sends that way. */
function watchSends(marker) {
  // The first 28 bytes: what one image's top row holds as pixels.
  const needle = new TextEncoder().encode(marker.slice(0, 28));
  window.shoalSent = { channel: 0, websocket: 0, markerSeen: false };
  const tails = new WeakMap();
  const bytesOf = (data) => {
    if (typeof data === 'string') return new TextEncoder().encode(data);
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return new Uint8Array(0); // a Blob: Shoal sends none
  };
  const look = (owner, data, kind) => {
    const bytes = bytesOf(data);
    window.shoalSent[kind] += bytes.length;
    const tail = tails.get(owner) ?? new Uint8Array(0);
    const hay = new Uint8Array(tail.length + bytes.length);
    hay.set(tail);
    hay.set(bytes, tail.length);
    outer: for (let i = 0; i + needle.length <= hay.length; i++) {
      for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
      window.shoalSent.markerSeen = true;
      break;
    }
    tails.set(owner, hay.slice(Math.max(0, hay.length - needle.length)));
  };
  // The search finds the marker even split across two messages (checked here, then reset).
  const probe = {};
  look(probe, needle.slice(0, 5), 'channel');
  look(probe, needle.slice(5), 'channel');
  window.shoalSent.watchWorks = window.shoalSent.markerSeen;
  window.shoalSent = { ...window.shoalSent, channel: 0, markerSeen: false };
  const wrap = (proto, kind) => {
    const send = proto.send;
    proto.send = function (data) {
      look(this, data, kind);
      return send.call(this, data);
    };
  };
  wrap(RTCDataChannel.prototype, 'channel');
  wrap(WebSocket.prototype, 'websocket');
}

async function visitor(v, bodies) {
  const context = await browser.newContext();
  await context.grantPermissions(['microphone', 'camera']);
  // Every HTTP request of the page and its worker: its URL, headers and body.
  context.on('request', (r) => bodies.push({
    url: r.url(),
    bytes: Buffer.concat([Buffer.from(r.url()), Buffer.from(JSON.stringify(r.headers())), r.postDataBuffer() ?? Buffer.alloc(0)]),
  }));
  await context.addInitScript(watchSends, MARKER);
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
  await page.goto(`${server.url}/?task=mine&backend=cpu`);
  await page.waitForSelector('#local-card:not([hidden])', { timeout: 60_000 });
  assert.equal(await page.locator('#consent').isDisabled(), true, 'no consent before files are chosen');
  assert.match(await page.textContent('#local-about'), /never uploaded/);
  assert.match(await page.textContent('#privacy'), /your files never leave this browser/);
  await page.setInputFiles('#local-files', filesOf(v));
  await page.waitForFunction(() => window.shoalLocal, null, { timeout: 60_000 });
  const s = await page.evaluate(() => window.shoalLocal);
  assert.equal(s.samples, PER_VISITOR, JSON.stringify(s.skipped));
  const reasons = Object.fromEntries(s.skipped.map((k) => [k.file, k.reason]));
  assert.deepEqual(Object.keys(reasons).sort(), ['broken.png', 'eleven.png', 'filled.jpg', 'huge.png', 'notes.txt', 'unlabelled.png']);
  assert.match(reasons['filled.jpg'], /^30000x30000 pixels, more than/);
  assert.match(reasons['notes.txt'], /not a PNG or JPEG/);
  assert.match(reasons['broken.png'], /not a readable image/);
  assert.match(reasons['huge.png'], /more than the task's limit of 20000/);
  assert.match(reasons['unlabelled.png'], /no label/);
  assert.match(reasons['eleven.png'], /"11" is not a class/);
  const summary = await page.textContent('#local-summary');
  console.log(`visitor ${v}: ${summary}`);
  assert.match(summary, new RegExp(`^${PER_VISITOR + 1} files, ${PER_VISITOR} samples \\(0: \\d+`));
  assert.equal(await page.locator('#local-skipped li').count(), 6);
  assert.ok(await page.locator('#local-previews canvas').count() > 0, 'previews of the images');
  await page.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  await pressConsent(page);
  return page;
}

test('visitors train on files they choose, and no byte of those files leaves their browser', async () => {
  const bodies = [];
  const pages = [await visitor(0, bodies), await visitor(1, bodies)];
  // Together they learn the digits from their 800 images (measured on the server's test
  // split, which is all each downloads).
  await Promise.all(pages.map((page) => page.waitForFunction(
    (target) => window.shoalProgress.some((e) => e.round >= 10 && e.peers >= 1 && e.used >= 5 && e.accuracy >= target),
    TARGET, { timeout: 300_000, polling: 500 })));
  for (const [v, page] of pages.entries()) {
    const last = await page.evaluate(() => window.shoalProgress.at(-1));
    const sent = await page.evaluate(() => window.shoalSent);
    console.log(`visitor ${v}: round ${last.round}, accuracy ${(last.accuracy * 100).toFixed(1)}%, `
      + `sent ${sent.channel} bytes over data channels, ${sent.websocket} over the websocket`);
    assert.equal(sent.watchWorks, true, 'the watch finds the marker where it is');
    assert.equal(sent.markerSeen, false, 'no file byte left over a data channel or the websocket');
    assert.ok(sent.channel > 100_000, 'model updates did leave');
    assert.ok(last.used >= 5, 'each used the other\'s updates');
  }
  // The capture sees the worker's requests (the test split only the worker fetches).
  assert.ok(bodies.some((b) => b.url.endsWith('/data/digits/test-images.idx')), 'worker requests are captured');
  const marker = Buffer.from(MARKER);
  const inPixels = Buffer.from(MARKER.slice(0, 28), 'latin1');
  assert.ok(bodies.every((b) => !b.bytes.includes(marker) && !b.bytes.includes(inPixels)),
    'no file byte in any HTTP request URL, header or body');
  // The watch works: the marker is in the files the visitors chose.
  assert.ok(filesOf(0).some((f) => f.buffer.includes(marker)));
});
