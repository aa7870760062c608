// Shoal's training worker: loads the wasm module and runs everything heavy off the main
// thread: the WebGPU probe, then (after the visitor's consent) the swarm peer's training
// loop. The WebRTC connections live on the page's main thread (browsers have none in
// workers); messages pass through `postMessage`.
import init, { probe, SwarmPeer, LocalFiles, EarlyEvents, sha256Hex } from './pkg/shoal_web_client.js';
import { fetchTaskFiles } from './data.js';

let backend = 'cpu';
let peer = null;
// Transport events that arrive while the peer is still being created (an `EarlyEvents`
// once the module is loaded: bounded per neighbour, as the peer's own inbox).
let early = null;
// The task's parameter count, once its description is in (bounds `early`).
let parameters = NaN;
// Share of wall time spent training (the visitor's throttle), and pause states that
// arrive before the peer exists.
let duty = 1;
let visitorPaused = false;
let taskPaused = null;

// The visitor's latest request to try the model (a prompt, a drawing), answered between
// two ticks; a newer request replaces one not yet answered.
let tryRequest = null;

const post = (m, transfer) => self.postMessage(m, transfer ?? []);
const errorText = (e) => String(e && e.message ? e.message : e);

// The visitor's own files, checked (a task on local data): read and decoded here, in the
// worker; nothing of them leaves it.
let local = null;
let loading = Promise.resolve();
// The page's latest choice of files: an earlier reading still in progress gives way.
let readingNow = 0;

async function main() {
  try {
    await (loading = init());
    const result = JSON.parse(await probe());
    backend = result.backend === 'gpu' && result.check === 'ok' ? 'webgpu' : 'cpu';
    post({ type: 'probe', result });
  } catch (e) {
    post({ type: 'error', message: errorText(e), fatal: true });
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// Lets the worker's queued messages (network events from the page, 'try' requests) in
// between two ticks without the 4 ms that a chain of zero timeouts costs: a peer in rounds
// sized in time trains tick after tick and would otherwise never read them.
const yielder = new MessageChannel();
const yieldToMessages = () => new Promise((resolve) => {
  yielder.port1.onmessage = () => resolve();
  yielder.port2.postMessage(null);
});

function netEvent(m) {
  if (m.kind === 'task_state') peer.setPaused('task', m.paused);
  else peer.event(m.kind, m.peer, m.data);
}

// Tells the page a message is in the peer's bounded inbox (or dropped by it): the page
// hands on only so many bytes that the worker has not taken (relay.js, `MAX_UNTAKEN`).
const taken = (m) => { if (m.data) post({ type: 'taken', bytes: m.data.length }); };

// An event before the peer exists: kept (within bounds) for the peer to adopt. Until the
// module has loaded it waits on the loading, in order.
function earlyEvent(m) {
  loading.then(() => {
    if (peer) return netEvent(m);
    if (!early) {
      early = new EarlyEvents();
      early.setParameters(parameters);
    }
    early.event(m.kind, m.peer, m.data);
  }).catch((e) => post({ type: 'error', message: errorText(e) })).finally(() => taken(m));
}

/** The width and height a PNG or JPEG file declares (read from its first 64 KiB), or
 *  null: checked before decoding, so that a small file cannot claim gigabytes. */
async function declaredSize(file) {
  const b = new Uint8Array(await file.slice(0, 65536).arrayBuffer());
  const v = new DataView(b.buffer);
  if (b.length >= 24 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) {
    return [v.getUint32(16), v.getUint32(20)];
  }
  if (b.length >= 4 && b[0] === 0xff && b[1] === 0xd8) {
    // JPEG: walk the segments to a start-of-frame (C0-CF but C4, C8, CC), as decoders
    // do: fill bytes (0xFF) before a marker, and markers without a length (01, D0-D7),
    // are stepped over (read as lengths, a file could send the walk past its real frame
    // to a small one the decoder never reads). No frame before the scan: none.
    for (let i = 2; i + 9 < b.length;) {
      if (b[i] !== 0xff) return null;
      const m = b[i + 1];
      if (m === 0xff) {
        i += 1;
        continue;
      }
      if (m === 0x01 || (m >= 0xd0 && m <= 0xd7)) {
        i += 2;
        continue;
      }
      if (m === 0x00 || m === 0xd8 || m === 0xd9 || m === 0xda) return null;
      if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) {
        return [v.getUint16(i + 7), v.getUint16(i + 5)];
      }
      i += 2 + v.getUint16(i + 2);
    }
  }
  return null;
}

const MAX_IMAGE_PIXELS = 1 << 24;

/** Reads and checks the visitor's files (`entries`: `{ file, path }`), one at a time: a
 *  bad one is skipped with its reason. Images are decoded with the browser's codecs,
 *  scaled to the model's input and turned grey. Posts a summary and a few previews
 *  (`reading` tells the page which of its choices this answers). */
async function chooseLocal(taskJson, reading, entries) {
  await loading;
  const set = new LocalFiles(taskJson);
  const kind = set.kind();
  const [w, h] = set.imageSize();
  const previews = [];
  const canvas = kind === 'images' ? new OffscreenCanvas(w, h) : null;
  const ctx = canvas?.getContext('2d', { willReadFrequently: true });
  // A labels.csv first: the images after it take their labels from it.
  const isTable = (e) => kind === 'images' && e.file.name.toLowerCase() === 'labels.csv';
  const ordered = [...entries.filter(isTable), ...entries.filter((e) => !isTable(e))];
  for (const [i, { file, path }] of ordered.entries()) {
    if (reading !== readingNow) {
      set.free();
      return; // the visitor chose other files meanwhile
    }
    if (set.full()) {
      set.notRead(ordered.length - i);
      break;
    }
    const name = path || file.name;
    if (!set.admit(name, file.size)) continue;
    try {
      if (isTable({ file })) {
        set.labelTable(name, new Uint8Array(await file.arrayBuffer()));
      } else if (kind === 'images') {
        if (!/\.(png|jpe?g)$/i.test(file.name)) {
          set.skip(name, 'not a PNG or JPEG image');
          continue;
        }
        const size = await declaredSize(file);
        if (size && size[0] * size[1] > MAX_IMAGE_PIXELS) {
          set.skip(name, `${size[0]}x${size[1]} pixels, more than ${MAX_IMAGE_PIXELS} (4096x4096)`);
          continue;
        }
        let bitmap;
        try {
          if (!size) throw new Error('no image header');
          bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none' });
        } catch (e) {
          set.skip(name, `not a readable image (${errorText(e)})`);
          continue;
        }
        ctx.fillStyle = 'black';
        ctx.fillRect(0, 0, w, h);
        ctx.drawImage(bitmap, 0, 0, w, h);
        bitmap.close();
        const rgba = ctx.getImageData(0, 0, w, h).data;
        const grey = new Uint8Array(w * h);
        for (let k = 0; k < grey.length; k++) {
          grey[k] = Math.round(0.299 * rgba[4 * k] + 0.587 * rgba[4 * k + 1] + 0.114 * rgba[4 * k + 2]);
        }
        const parts = name.split('/');
        const folder = parts.length > 1 ? parts[parts.length - 2] : undefined;
        if (!set.addImage(name, folder, grey, w, h) && previews.length < 12) {
          previews.push({ name, grey, width: w, height: h });
        }
      } else {
        const bytes = new Uint8Array(await file.arrayBuffer());
        if (kind === 'csv') set.addCsv(name, bytes);
        else set.addText(name, bytes);
      }
    } catch (e) {
      set.skip(name, `could not be read (${errorText(e)})`);
    }
  }
  if (reading !== readingNow) {
    set.free();
    return;
  }
  local?.free();
  local = set;
  post({ type: 'local-summary', reading, summary: JSON.parse(set.summary()), kind, previews });
}

// Joins the swarm and trains until the page says stop. Each tick either trains (a round,
// or a chunk of a round sized in time), closes a round, or finds nothing to do (then the
// worker sleeps briefly). After each tick that trained, the throttle rests for the time
// the duty cycle asks.
// The ledger's witness (docs/protocol.md, "Signed heads and gossip"): every 15 s the heads
// this peer holds (kept from an earlier visit, or gossiped by a neighbour) are checked
// against the server's ledger; the page shows the verdict and keeps the newest head that
// checked out. The server's answers are awaited beside training, not in its loop: a
// server slow to answer (each lookup may take 5 s) froze the worker's training, its
// neighbours' messages and the visitor's tries for up to 10 s in every 15. The peer is
// asked only between two ticks (what to look up, then the verdict).
const WITNESS_EVERY_MS = 15_000;
let witnessing = false;
let witnessAnswer = null;
// Checks failed in a row. From the second (one busy answer, `429`, is not worth a word)
// the page says the ledger is not checked, not the verdict of the last check that ran:
// a server that cut its ledger and then answered garbage, or nothing, was shown intact
// for the rest of the visit.
let witnessFailures = 0;
function witnessFailed(reason) {
  witnessFailures += 1;
  if (witnessFailures >= 2) post({ type: 'ledger', verdict: { unchecked: true, reason } });
}

function judgeLedger({ at, pages }) {
  witnessAnswer = null;
  if (!peer) return;
  try {
    // What the server shows at each index looked up ("" where it has no entry, or one
    // that is not an entry: as shoal-peer reads it, a catch, not a check that failed).
    const hashes = at.map((i, k) => {
      const entries = Array.isArray(pages[k]?.entries) ? pages[k].entries : [];
      const hash = entries.find((x) => x?.index === i)?.hash;
      return typeof hash === 'string' ? hash : '';
    });
    const head = pages.at(-1)?.signed_head;
    const verdict = JSON.parse(peer.checkLedger(head == null ? null : String(head), at, hashes));
    witnessFailures = 0;
    if (verdict) post({ type: 'ledger', verdict });
  } catch (e) {
    witnessFailed(`its answer could not be checked (${errorText(e)})`);
  }
}

async function witness(task) {
  witnessing = true;
  try {
    const at = Array.from(peer.ledgerLookups());
    const base = `/api/tasks/${encodeURIComponent(task)}/ledger`;
    // A hung request must not stop training: each has 5 s.
    const get = async (query) => {
      const r = await fetch(`${base}?${query}`, { signal: AbortSignal.timeout(5000) });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return r.json();
    };
    // One lookup at a time: the server computes at most 2 ledger requests at once for an
    // address, and the page's credits are one of them.
    const pages = [];
    for (const i of (at.length ? at : [null])) pages.push(await get(i === null ? 'limit=1' : `from=${i}&limit=1`));
    witnessAnswer = { at, pages };
  } catch (e) {
    // The server is unreachable or busy: the next check will tell.
    witnessFailed(`the server did not answer (${errorText(e)})`);
  } finally {
    witnessing = false;
  }
}

async function contribute(task, secret, head, privacySent, consented, mine, revision) {
  const r = await fetch(`/api/tasks/${encodeURIComponent(task)}`);
  if (!r.ok) throw new Error(`the server does not offer the task "${task}" (HTTP ${r.status})`);
  const desc = await r.json();
  // What neighbours send meanwhile is bounded by the task's largest message.
  parameters = desc.cost?.parameters ?? NaN;
  early?.setParameters(parameters);
  // The visitor agreed to the privacy the page showed them: train under exactly that.
  if (JSON.stringify(desc.privacy ?? null) !== JSON.stringify(consented ?? null)) {
    throw new Error('the task\'s privacy settings changed since you agreed to them; reload the page to see the new ones');
  }
  // The task the visitor agreed to, as a whole: its model, data and settings.
  if (revision && desc.revision !== revision) {
    throw new Error('the task changed on the server since you agreed to it; reload the page to see what it asks now');
  }
  const files = await fetchTaskFiles(desc, sha256Hex);
  // A task on local data trains on the files the visitor chose (the set summarised when
  // they consented).
  peer = await SwarmPeer.create(backend, secret, JSON.stringify(desc.task), files, mine ?? undefined);
  // Rounds this visitor already sent under the task's privacy budget, and the noise they
  // were sent with (kept by the page).
  if (privacySent?.rounds > 0) peer.notePrivacySent(privacySent.rounds, privacySent.z);
  let counted = privacySent?.rounds ?? 0;
  if (early) peer.adopt(early);
  early?.free();
  early = null;
  if (head) {
    try {
      peer.rememberHead(head);
    } catch (e) {
      // Not evidence of anything: storage from another version or damaged. Forget it.
      post({ type: 'ledger', verdict: { stale: true, reason: `the head kept from an earlier visit was unreadable (${errorText(e)})` } });
    }
  }
  let witnessed = -Infinity;
  if (visitorPaused) peer.setPaused('visitor', true);
  if (taskPaused !== null) peer.setPaused('task', taskPaused);
  post({ type: 'joined', key: peer.publicKey(), backend });
  let phase = '';
  let shown = 0;
  while (peer) {
    const started = performance.now();
    const p = JSON.parse(await peer.tick());
    const spent = performance.now() - started;
    // The page keeps the privacy count before it relays the update that raised it.
    if (p.privacy && p.privacy.rounds !== counted) {
      counted = p.privacy.rounds;
      post({ type: 'privacy-sent', rounds: counted, z: p.privacy.noise_multiplier });
    }
    for (const [to, data] of peer.outgoing()) post({ type: 'send', peer: to, data }, [data.buffer]);
    // Neighbours that broke the protocol: the page closes them and asks for others.
    for (const to of peer.takeDrops()) post({ type: 'drop', peer: to });
    if (p.report) {
      post({ type: 'report', report: JSON.stringify(p.report) });
      delete p.report;
    }
    for (const receipt of p.signed_receipts ?? []) post({ type: 'receipt', receipt });
    delete p.signed_receipts;
    // The page hears of every phase change and closed round, and otherwise at most four
    // times a second: each message is a task on the visitor's main thread.
    const now = performance.now();
    if (p.closed || p.phase !== phase || now - shown >= 250) {
      post({ type: 'progress', progress: p });
      shown = now;
    }
    if (tryRequest) answerTry();
    // The lookups go on beside training; their verdict is taken between two ticks.
    if (witnessAnswer) judgeLedger(witnessAnswer);
    if (now - witnessed >= WITNESS_EVERY_MS && !witnessing) {
      witnessed = now;
      witness(task);
    }
    phase = p.phase;
    if (p.trained && duty < 1) await sleep(spent * (1 / duty - 1));
    else if (!p.closed && p.phase !== 'training') await sleep(25);
    else await yieldToMessages();
  }
}

function answerTry() {
  const { id, kind, input } = tryRequest;
  tryRequest = null;
  try {
    const started = performance.now();
    const result = JSON.parse(peer.tryModel(kind, input, Math.floor(Math.random() * 2 ** 32)));
    post({ type: 'tried', id, result, ms: performance.now() - started });
  } catch (e) {
    post({ type: 'tried', id, error: errorText(e) });
  }
}

self.addEventListener('message', (event) => {
  const msg = event.data;
  try {
    if (msg.type === 'start' && !peer) {
      if (msg.backend === 'cpu') backend = 'cpu';
      if (msg.duty) duty = msg.duty;
      const mine = local;
      local = null;
      readingNow = -1; // no later reading replaces the set in training
      contribute(msg.task, msg.secret, msg.head, msg.privacySent, msg.consented, mine, msg.revision).catch((e) => {
        peer = null;
        if (tryRequest) {
          post({ type: 'tried', id: tryRequest.id, error: 'Shoal stopped: there is no model to try.' });
          tryRequest = null;
        }
        post({ type: 'error', message: errorText(e), fatal: true });
      });
    } else if (msg.type === 'local-files' && !peer) {
      readingNow = msg.reading;
      chooseLocal(msg.task, msg.reading, msg.entries ?? [])
        .catch((e) => post({ type: 'local-summary', reading: msg.reading, error: errorText(e) }));
    } else if (msg.type === 'net') {
      if (peer) {
        try {
          netEvent(msg);
        } finally {
          taken(msg);
        }
      } else if (msg.kind === 'task_state') taskPaused = msg.paused;
      else earlyEvent(msg);
    } else if (msg.type === 'try') {
      if (!(msg.input instanceof Uint8Array) || msg.input.length > 1 << 20) {
        post({ type: 'tried', id: msg.id, error: 'the input is not bytes, or longer than 1 MiB' });
      } else if (!peer) {
        post({ type: 'tried', id: msg.id, error: 'Shoal has no model here yet: contribute first, and try it once it has joined.' });
      } else {
        tryRequest = { id: msg.id, kind: msg.kind, input: msg.input };
      }
    } else if (msg.type === 'pause') {
      visitorPaused = msg.paused;
      peer?.setPaused('visitor', msg.paused);
    } else if (msg.type === 'throttle') {
      duty = Math.min(1, Math.max(0.05, msg.duty));
    } else if (msg.type === 'stop') {
      peer = null;
      if (tryRequest) {
        post({ type: 'tried', id: tryRequest.id, error: 'Shoal stopped: there is no model to try.' });
        tryRequest = null;
      }
    }
  } catch (e) {
    post({ type: 'error', message: errorText(e) });
  }
});

main();
