// The contributor's controls, shared by the contributor page (index.html) and the
// embedded widget's frame (embed.html): the worker that trains, consent, pause/resume,
// the throttle, automatic pauses (hidden tab, battery), and live progress. All
// computation happens in the worker, so the page stays responsive.
import { relaySwarm, fetchTask, fmtBytes } from './relay.js';
import { tryTheModel } from './try.js';
import { guardPresses, refusal } from './consent.js';

// The most entries the page's histories below keep (the oldest go first): an hour of
// rounds a second, so a tab left open for days holds no more.
const HISTORY = 3600;
const remember = (list, entry) => {
  if (list.length >= HISTORY) list.shift();
  list.push(entry);
};

// Long main-thread tasks (over 50 ms), for anyone (and the end-to-end test) who wants to
// check that Shoal keeps the page responsive.
window.shoalLongTasks = [];
try {
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      remember(window.shoalLongTasks, { start: e.startTime, duration: e.duration, name: e.name });
    }
  }).observe({ type: 'longtask', buffered: true });
} catch {
  // No long-task timing in this browser.
}

// Every closed round's progress, for anyone who wants the history.
window.shoalProgress = [];
// The relay between the swarm and the worker: bytes handed on and not yet taken, the
// most ever, and the page's inbox drops (relay.js).
window.shoalRelay = {};

// The visitor's identity: an ed25519 secret made once and kept in this browser, so that
// contributions across visits are signed by the same key. A browser may deny a frame on
// another site its storage (third-party storage blocking): then the identity lasts for
// this visit only, and the page says so, instead of failing to start.
function identity() {
  const fresh = () => Array.from(crypto.getRandomValues(new Uint8Array(32)), (b) => b.toString(16).padStart(2, '0')).join('');
  try {
    let s = localStorage.getItem('shoal-identity');
    if (!/^[0-9a-f]{64}$/.test(s ?? '')) {
      s = fresh();
      localStorage.setItem('shoal-identity', s);
    }
    return { secret: s, lasting: true };
  } catch {
    return { secret: fresh(), lasting: false };
  }
}

// A start that has not reached the swarm after this long says so (it keeps trying).
const SLOW_JOIN_MS = 60_000;

const $ = (id) => document.getElementById(id);

// Whether the page was opened with `?backend=cpu`: Shoal's own pages only, not the widget's
// frame, whose address the embedding site writes (a site must not choose the visitor's
// device for them).
const cpuAsked = () => window === window.top && new URLSearchParams(location.search).get('backend') === 'cpu';

const REASONS = { button: 'you paused it', hidden: 'this tab is hidden', battery: 'on battery', task: 'the researcher paused the task',
  unseen: 'Shoal is not shown on this page' };
// In a frame (the widget), Shoal trains only while the visitor can see its status and its
// Pause button, whole: hidden, covered, made transparent, or out of view even in part
// (a page that keeps the frame so small, or so far off the edge, that a sliver of the
// status shows) for this long, it pauses, and it resumes once shown again for `SEEN_AGAIN_MS` without a break (a page
// that flashes it into view now and then does not keep it training). Once it paused so, it
// pauses within `STRUCK_MS` of being unseen (for a second at least: it resumes once seen again for `SEEN_AGAIN_MS`), until seen
// for `FORGIVEN_MS` without a break: a page that hid it for just under 2 s and showed it
// for over 1 s, again and again, kept it training unseen and showed "Paused" when seen.
const UNSEEN_MS = 2000;
const SEEN_AGAIN_MS = 1000;
const STRUCK_MS = 300;
const FORGIVEN_MS = 30000;

/**
 * Runs the contributor UI. `task`: the task's name; `autoStart`: consent was already
 * given (the widget's click); `duty`: the throttle (0.25, 0.5 or 1); `compact`: fewer
 * rows (the widget); `agreed`: the revision of the task whose terms the visitor agreed
 * to elsewhere (the widget's card), which alone it trains.
 */
export function contributor({ task, autoStart = false, duty = 1, compact = false, agreed = null }) {
  const backend = $('backend');
  const detail = $('detail');
  const consent = $('consent');
  const pauseButton = $('pause');
  // Re-observes an element for the frame's visibility watch (below; none outside a frame).
  let rewatch = null;
  const throttle = $('throttle');
  const status = $('status');
  const stats = $('stats');
  const paused = new Set();
  let started = false;
  let probed = false;
  // A task on the visitor's own files: what the worker made of the files chosen.
  let localSummary = null;
  let readings = 0;
  const isLocal = () => description?.task?.data?.source === 'local';
  const ready = () => probed && Boolean(description)
    && (!isLocal() || (localSummary !== null && localSummary.samples >= localSummary.min_samples));
  let description = null;

  const show = (state, text, more = '') => {
    backend.dataset.state = state;
    backend.textContent = text;
    if (detail) detail.textContent = more;
  };
  const say = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };

  const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });

  // The visitor is told "contributing" only once this device has trained: before that it
  // is joining (downloading the task, the model, waiting for its first round).
  let working = false;
  // The swarm connection, once asked for: closed when the worker stops for good (it
  // failed to load, or its task's data or model could not be had), so that a peer that
  // does not train holds no neighbour's place.
  let relaying = null;
  // Whether Shoal stopped on this page for good (not an error it goes on after).
  let halted = false;
  const leave = () => {
    halted = true;
    return relaying?.then((swarm) => swarm.close()).catch(() => {});
  };
  let lasting = true;
  function applyPause() {
    worker.postMessage({ type: 'pause', paused: [...paused].some((r) => r !== 'task') });
    if (pauseButton) pauseButton.textContent = paused.has('button') ? 'Resume' : 'Pause';
    if (!started || status.dataset.state === 'error') return;
    const visit = lasting ? '' : ' This browser keeps no storage for Shoal here, so your identity lasts for this visit only.';
    if (paused.size) say('paused', `Paused: ${[...paused].map((r) => REASONS[r]).join(', ')}.`);
    else if (!working) say('joining', `Joining the swarm: downloading the task and the model…${visit}`);
    else say('running', `Contributing. Thank you!${visit}`);
  }

  // The progress rows, drawn at most once a frame and in place (the same elements, new
  // text), so that progress costs the page next to nothing.
  let pending = null;
  const cells = new Map();
  function render(p) {
    if (!pending) requestAnimationFrame(draw);
    pending = p;
  }
  // Data exchanged per hour while contributing: over the last 10 minutes of time not
  // paused, once this device has trained (the figure was the average since it started,
  // paused time included, so it shrank while paused and read a third of the rate for a
  // while after). `points`: [time not paused (ms), bytes], at most one a second.
  const points = [];
  let running = 0;
  let lastAt = null;
  // Counted every second, a second at most each time (progress is drawn only while the
  // tab shows: counted there, a tab hidden for an hour added that hour on its return).
  function countRunning() {
    const now = performance.now();
    if (lastAt !== null && !paused.size && !document.hidden) running += Math.min(now - lastAt, 1000);
    lastAt = now;
  }
  setInterval(countRunning, 1000);
  function perHour(p) {
    if (p.samples === 0) return '–';
    countRunning();
    const bytes = p.bytes_up + p.bytes_down;
    if (!points.length || running - points[points.length - 1][0] >= 1000) points.push([running, bytes]);
    while (points.length > 2 && running - points[1][0] >= 600_000) points.shift();
    const [from, before] = points[0];
    const ms = running - from;
    return ms < 10_000 ? '–' : fmtBytes((bytes - before) / (ms / 3.6e6));
  }

  const text = () => Boolean(description?.task?.data?.train?.text) || description?.task?.data?.local?.kind === 'text';

  // The visitor's credits, from the task's ledger: samples of theirs that neighbours the
  // server drew at random receipted (not what this page counts itself).
  let credits = '–';
  // What this browser witnessed of the ledger: the worker checks the newest head the
  // server signed that this browser saw (on this visit or an earlier one, kept in
  // storage) or that a neighbour gossiped, against the server's ledger now.
  let ledger = '–';
  const headSlot = `shoal-ledger-signed-${task}`;
  const storedHead = () => {
    try {
      return localStorage.getItem(headSlot);
    } catch {
      return null; // a browser that denies storage witnesses this visit only
    }
  };
  // Updates this browser's key sent under the task's privacy budget, across visits: the
  // worker counts on from it, and stops (or warns) at the budget.
  const privacySlot = `shoal-privacy-${task}`;
  const storedPrivacy = () => {
    let kept = null;
    try {
      kept = localStorage.getItem(privacySlot);
    } catch {
      return null; // a browser that denies storage counts this visit only (its key lasts as long)
    }
    if (kept === null) return null;
    try {
      const v = JSON.parse(kept);
      if (Number.isSafeInteger(v.rounds) && v.rounds >= 0 && v.z > 0) return { rounds: v.rounds, z: v.z };
    } catch {
      // Below.
    }
    // Damaged: count the budget as spent rather than start it again.
    return { rounds: 1e12, z: 1 };
  };
  function keepPrivacy(rounds, z) {
    if (!lasting) return;
    try {
      localStorage.setItem(privacySlot, JSON.stringify({ rounds, z }));
    } catch (e) {
      // The count did not keep (storage full, or taken away): a later visit under the
      // same key would spend these rounds again. Nothing more leaves: the worker stops
      // here, and the swarm closes before this tick's updates (posted after the count)
      // are handed to it.
      worker.terminate();
      leave();
      say('error', `Shoal stopped: this browser could not store how much of the privacy budget is spent (${e?.name ?? e}), so no more updates leave it. Free some of this site's storage and reload to contribute again.`);
    }
  }
  function privacyRow(dp) {
    if (!dp) return 'none: updates leave as trained';
    const spent = `epsilon ${dp.epsilon.toFixed(2)} of ${dp.budget_epsilon.toFixed(2)} (${dp.rounds} of ${dp.budget_rounds} rounds)`;
    if (dp.stopped) return `${spent}: budget spent, no more updates leave this device`;
    return dp.spent ? `${spent}: budget passed` : spent;
  }

  // The visitor's own files (a task on local data): chosen with a picker or dropped,
  // checked in the worker, summarised here before anything trains.
  function localFiles(d) {
    const card = $('local-card');
    if (!card) {
      // The embedded widget has no room to choose files: the full page has.
      say('error', 'This task trains on files you choose, which this widget cannot do: open the full page to contribute.');
      if (consent) consent.disabled = true;
      return;
    }
    card.hidden = false;
    const kinds = {
      images: 'PNG or JPEG images, in folders named after their class (or listed in a labels.csv of "file name,label" lines)',
      csv: 'CSV files of rows: a label, then the pixel values 0-255',
      text: 'UTF-8 text files',
    };
    const l = d.task.data.local;
    const classes = l.label_names?.length ? l.label_names.join(', ') : `0 to ${d.task.data.classes - 1}`;
    $('local-about').textContent = `This task trains on files you choose: ${kinds[l.kind]}`
      + (l.kind === 'text' ? '' : ` (classes: ${classes})`)
      + `; at most ${l.max_files.toLocaleString('en')} files of ${fmtBytes(l.max_file_bytes)} each. `
      + 'They are read here, in your browser, and never uploaded: only model updates leave it.';
    const send = (files) => {
      if (started) return;
      // Until the worker has read these, nothing is ready to train (an earlier choice
      // is replaced, not added to).
      localSummary = null;
      readings += 1;
      if (consent) consent.disabled = true;
      $('local-summary').textContent = `Reading ${files.length} files…`;
      worker.postMessage({ type: 'local-files', task: JSON.stringify(d.task), reading: readings, entries: files });
    };
    const picked = (input) => input?.addEventListener('change', () => {
      send(Array.from(input.files, (file) => ({ file, path: file.webkitRelativePath || file.name })));
    });
    picked($('local-files'));
    picked($('local-folder'));
    const drop = $('local-drop');
    drop?.addEventListener('dragover', (e) => { e.preventDefault(); drop.dataset.over = 'true'; });
    drop?.addEventListener('dragleave', () => { delete drop.dataset.over; });
    drop?.addEventListener('drop', async (e) => {
      e.preventDefault();
      delete drop.dataset.over;
      const entries = [];
      // Every dropped item is taken before the first await: the list empties after it.
      const items = Array.from(e.dataTransfer.items, (item) => ({ entry: item.webkitGetAsEntry?.(), file: item.kind === 'file' ? item.getAsFile() : null }));
      const walk = async (entry, prefix, depth) => {
        if (entries.length > 100_000 || depth > 8) return;
        if (entry.isFile) {
          const file = await new Promise((res, rej) => entry.file(res, rej));
          entries.push({ file, path: prefix + file.name });
        } else if (entry.isDirectory) {
          const reader = entry.createReader();
          for (;;) {
            const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
            if (!batch.length) break;
            for (const child of batch) await walk(child, `${prefix}${entry.name}/`, depth + 1);
          }
        }
      };
      for (const { entry, file } of items) {
        if (entry) await walk(entry, '', 0);
        else if (file) entries.push({ file, path: file.name });
      }
      send(entries);
    });
  }

  function showLocal(msg) {
    if (msg.reading !== readings) return; // an earlier choice, replaced since
    const out = $('local-summary');
    if (msg.error) {
      if (out) out.textContent = `Your files could not be read: ${msg.error}`;
      return;
    }
    const s = msg.summary;
    localSummary = s;
    window.shoalLocal = s;
    const counts = s.per_class.filter(([, n]) => n > 0).map(([name, n]) => `${name}: ${n}`).join(', ');
    if (out) {
      out.textContent = s.samples > 0
        ? `${s.files} files, ${s.samples.toLocaleString('en')} ${msg.kind === 'text' ? 'windows of text' : 'samples'}`
          + `${counts ? ` (${counts})` : ''}. Nothing of them leaves this browser.`
          + (s.samples < s.min_samples ? ` Training takes at least ${s.min_samples}: choose more.` : '')
        : 'None of these files can be used (see below).';
    }
    const list = $('local-skipped');
    if (list) {
      list.replaceChildren(...s.skipped.slice(0, 200).map((k) => {
        const li = document.createElement('li');
        li.textContent = `${k.file}: ${k.reason}`;
        return li;
      }));
      const more = s.skipped.length - 200 + s.more_skipped;
      if (more > 0) list.append(`… and ${more} more`);
    }
    const shelf = $('local-previews');
    if (shelf) {
      shelf.replaceChildren(...(msg.previews ?? []).map((p) => {
        const canvas = document.createElement('canvas');
        canvas.width = p.width;
        canvas.height = p.height;
        canvas.title = p.name;
        const img = canvas.getContext('2d').createImageData(p.width, p.height);
        p.grey.forEach((v, i) => img.data.set([v, v, v, 255], 4 * i));
        canvas.getContext('2d').putImageData(img, 0, 0);
        return canvas;
      }));
    }
    if (consent) consent.disabled = !ready() || started;
  }

  function witnessed(v) {
    if (v.stale) {
      ledger = `not checked yet: ${v.reason}`;
      try {
        localStorage.removeItem(headSlot);
      } catch {
        // As below.
      }
    } else if (v.unchecked) {
      // Checks that failed; a catch stays shown (its evidence holds).
      if (!ledger.startsWith('history changed')) ledger = `not checked: ${v.reason}`;
    } else if (v.ok) {
      ledger = `${v.count.toLocaleString('en')} receipts, history intact`;
      try {
        if (v.head) localStorage.setItem(headSlot, v.head);
      } catch {
        // As above.
      }
    } else {
      // The head kept is not replaced: it is the evidence.
      if (!ledger.startsWith('history changed')) {
        console.error(`shoal: the server's ledger changed its history: ${v.reason}${v.evidence ? ` (signed head ${v.evidence})` : ''}`);
      }
      ledger = `history changed: ${v.reason}`;
    }
    window.shoalLedger = v;
  }
  async function fetchCredits(key) {
    try {
      const r = await fetch(`/api/tasks/${encodeURIComponent(task)}/credits?key=${key}`);
      if (!r.ok) return;
      const c = await r.json();
      credits = c.me.credit > 0
        ? `${c.me.credit.toLocaleString('en')} samples (#${c.me.rank} of ${c.ranked})`
        : 'none yet';
    } catch {
      // The next try will tell.
    }
  }

  // Neighbours that train, and those connected besides (joining, paused, observing).
  const peersText = (p) => (p.connected > p.peers ? `${p.peers} training, ${p.connected} connected` : String(p.peers));

  function draw() {
    const p = pending;
    pending = null;
    // A language model's quality is its held-out loss in bits per byte (lower is
    // better); an image model's, its held-out accuracy.
    const [qualityKey, quality] = text()
      ? ['held-out bits per byte', p.test_loss == null ? '–' : (p.test_loss / Math.LN2).toFixed(3)]
      : ['held-out accuracy', p.accuracy == null ? '–' : `${(p.accuracy * 100).toFixed(2)}%`];
    const rows = compact
      ? {
        round: p.round, 'samples/s': p.samples_per_s.toFixed(0), [qualityKey]: quality, peers: peersText(p), credits,
        ...(p.privacy ? { privacy: privacyRow(p.privacy) } : {}),
      }
      : {
        round: p.round, phase: p.phase, 'local steps': p.local_steps,
        'samples/s': p.samples_per_s.toFixed(0), 'samples contributed': p.samples,
        loss: p.privacy || isLocal() ? 'kept on this device' : p.samples > 0 ? p.loss.toFixed(4) : '–', [qualityKey]: quality, peers: peersText(p),
        'bytes up': fmtBytes(p.bytes_up), 'bytes down': fmtBytes(p.bytes_down),
        'data per hour': perHour(p),
        receipts: p.receipts, credits, ledger, privacy: privacyRow(p.privacy),
      };
    for (const [k, v] of Object.entries(rows)) {
      let dd = cells.get(k);
      if (!dd) {
        const dt = document.createElement('dt');
        dt.textContent = k;
        dd = document.createElement('dd');
        dd.dataset.key = k;
        stats.append(dt, dd);
        cells.set(k, dd);
      }
      const text = String(v);
      if (dd.textContent !== text) dd.textContent = text;
    }
  }

  function start() {
    if (started || !ready()) return;
    started = true;
    if (consent) {
      consent.disabled = true;
      consent.textContent = 'Joining the swarm…';
    }
    if (pauseButton) {
      pauseButton.hidden = false;
      // Observed afresh: shown out of view it crosses no threshold, and would never be
      // reported unseen.
      rewatch?.(pauseButton);
    }
    // A privacy budget is counted per browser: one tab at a time spends it. Without Web
    // Locks (a page not served over HTTPS or from localhost) no tab could tell another
    // spends it too, and each would spend the whole budget.
    if (description.privacy && !navigator.locks) {
      say('error', 'This task counts a privacy budget per browser, and this page cannot make sure that only one of its tabs spends it (the browser offers no Web Locks to a page not served over HTTPS). Contribute from the HTTPS address of this site.');
      return;
    }
    if (description.privacy) {
      navigator.locks.request(`shoal-privacy-${task}`, { ifAvailable: true }, (lock) => {
        if (!lock) {
          say('error', 'Another tab of this browser already contributes to this task, which counts a privacy budget per browser. Contribute from that tab, or close it and reload this one.');
          return undefined;
        }
        begin();
        return new Promise(() => {}); // held while this page lives
      });
    } else {
      begin();
    }
  }

  function begin() {
    try {
      const id = identity();
      lasting = id.lasting;
      // `?backend=cpu` trains on the CPU even where WebGPU exists (slow software adapters).
      const only = cpuAsked() ? 'cpu' : null;
      worker.postMessage({
        type: 'start', task, secret: id.secret, backend: only, duty, head: storedHead(),
        privacySent: id.lasting ? storedPrivacy() : null, consented: description.privacy ?? null,
        revision: description.revision ?? null,
      });
      applyPause();
      relaying = relaySwarm(worker, task, {
        secret: id.secret,
        parameters: description?.cost?.parameters,
        uploadMbPerHour: description?.task?.learn?.upload_mb_per_hour,
        revision: description?.revision,
        stats: window.shoalRelay,
        onStopped: (why) => {
          halted = true;
          say('error', `Shoal stopped: ${why}. Reload the page to try again.`);
        },
        onSignaling: (up) => {
          if (up) {
            if (status.dataset.state === 'offline') applyPause();
          } else if (status.dataset.state !== 'error') {
            say('offline', 'Lost the connection to the Shoal server; reconnecting. Peers already connected keep training together.');
          }
        },
      });
      relaying.catch((e) => {
        // Alone, the worker would train on from the seed, unseen, for as long as the tab
        // stays open.
        halted = true;
        worker.terminate();
        say('error', `Shoal could not join the swarm: ${e.message ?? e}`);
      });
    } catch (e) {
      say('error', `Shoal could not start here: ${e.message ?? e}`);
      return;
    }
    setTimeout(() => {
      if (!working && status.dataset.state === 'joining') {
        say('joining', 'Still joining after a minute: the task\'s data or the model is slow to arrive. Shoal keeps trying.');
      }
    }, SLOW_JOIN_MS);
  }

  worker.addEventListener('message', (event) => {
    const msg = event.data;
    if (msg.type === 'probe') {
      const r = msg.result;
      if (r.backend === 'gpu' && r.check === 'ok') {
        const soft = r.adapter.software ? ' (a software emulation: training will be slow)' : '';
        show('gpu', `WebGPU: ${r.adapter.description}${soft}`,
          `Backend ${r.adapter.backend}, device type ${r.adapter.device_type}; compute check: ${r.check}.`);
      } else if (r.backend === 'gpu') {
        show('cpu', 'Your GPU failed a compute check: Shoal will train on your CPU.', r.check);
      } else if (!self.isSecureContext) {
        // Browsers give WebGPU only to secure pages: the server, not the browser, is why.
        show('cpu', 'This page is not served over HTTPS, and browsers give WebGPU only to secure pages: Shoal will train on your CPU instead.', r.reason);
      } else {
        show('cpu', 'No WebGPU in this browser: Shoal will train on your CPU instead.', r.reason);
      }
      // The headline says where training runs: on the CPU when the page asks for it,
      // whatever adapter exists.
      if (cpuAsked() && r.backend === 'gpu') {
        const found = r.check === 'ok' ? `WebGPU adapter found (${r.adapter.description}), ` : '';
        show('cpu', 'Training on your CPU.', `${found}but this page was opened with ?backend=cpu.`);
      }
      probed = true;
      if (consent) consent.disabled = !ready();
      if (autoStart) start();
    } else if (msg.type === 'joined') {
      if (consent) consent.textContent = 'Contributing — thank you';
      // The visitor's public key, for anyone who wants to look it up in the ledger.
      window.shoalKey = msg.key;
      fetchCredits(msg.key);
      // Asked on until Shoal stops on this page for good (it asked on for as long as the
      // tab lived; an error it goes on after stops nothing).
      const credits = setInterval(() => {
        if (halted) clearInterval(credits);
        else fetchCredits(msg.key);
      }, 15_000);
      applyPause();
    } else if (msg.type === 'progress') {
      const p = msg.progress;
      if (p.task_paused !== paused.has('task')) {
        if (p.task_paused) paused.add('task'); else paused.delete('task');
        applyPause();
      }
      if (!working && p.samples > 0) {
        working = true;
        applyPause();
      }
      if (p.closed) remember(window.shoalProgress, { round: p.round, accuracy: p.accuracy, test_loss: p.test_loss, peers: p.peers, samples_per_s: p.samples_per_s,
        used: p.used, rejected: p.rejected, wasm_memory_bytes: p.wasm_memory_bytes, phase: p.phase, samples: p.samples, privacy: p.privacy,
        bytes_up: p.bytes_up, bytes_down: p.bytes_down, at: performance.now() });
      render(p);
    } else if (msg.type === 'local-summary') {
      showLocal(msg);
    } else if (msg.type === 'privacy-sent') {
      keepPrivacy(msg.rounds, msg.z);
    } else if (msg.type === 'ledger') {
      witnessed(msg.verdict);
    } else if (msg.type === 'error') {
      say('error', `Shoal stopped: ${msg.message}`);
      if (msg.fatal) leave();
    }
  });
  worker.addEventListener('error', (e) => {
    show('error', 'Shoal could not start in this browser.', e.message);
    say('error', 'Shoal stopped: its worker failed to load. Reload the page to try again.');
    leave();
  });

  // What the task is and what contributing costs.
  fetchTask(task).then((d) => {
    // The card stated the terms of the task as it was when the host page loaded: one
    // that changed since (epsilon 1 became 64, or its privacy went) is not what the
    // visitor agreed to, and the small frame has no room to state the new terms.
    if (agreed && d.revision !== agreed) {
      say('error', 'This task changed since its terms were shown to you: reload the page to see what it asks now.');
      halted = true;
      worker.terminate();
      return;
    }
    description = d;
    const title = $('task-title');
    if (title) title.textContent = d.task.title;
    const about = $('task-description');
    if (about) about.textContent = d.task.description;
    const cost = $('cost');
    if (cost) cost.textContent = costText(d.cost);
    const privacy = $('privacy');
    if (privacy) privacy.textContent = privacyText(d.privacy, isLocal());
    if (isLocal()) {
      if (cost) cost.textContent = cost.textContent.replace(/^Joining downloads (\S+ \S+) of training data once\./, 'Joining downloads $1 of test data once; you train on your own files.');
      localFiles(d);
    }
    tryTheModel(worker, d);
    if (consent) consent.disabled = !ready();
    if (autoStart) start();
  }).catch((e) => {
    if (consent) consent.disabled = true;
    say('error', `Cannot start: ${e.message}. Please try again later.`);
  });

  // A press arranged by another page's window (a popup closed at the first click of a
  // "double-click" over the button, a Space after a moved focus) starts nothing, as in
  // the widget's frame (./consent.js).
  const presses = consent ? guardPresses(consent) : null;
  consent?.addEventListener('click', (event) => {
    if (!event.isTrusted) return;
    const refused = refusal(presses.judge(event));
    if (refused) {
      say('refused', refused);
      return;
    }
    start();
  });
  pauseButton?.addEventListener('click', () => {
    if (paused.has('button')) paused.delete('button'); else paused.add('button');
    applyPause();
  });
  if (throttle) {
    throttle.value = String(Math.round(duty * 100));
    throttle.addEventListener('change', () => {
      duty = Number(throttle.value) / 100;
      worker.postMessage({ type: 'throttle', duty });
    });
  }

  // In a frame, a page that hides the frame after consent (or lays a false "Paused" over
  // it) pauses Shoal: the status and the Pause button (once shown) must each be whole in
  // view, and where the browser reports visibility as painted (Chromium's
  // IntersectionObserver v2), neither covered, transparent nor transformed.
  if (window !== window.top && typeof IntersectionObserver !== 'undefined') {
    const painted = typeof IntersectionObserverEntry !== 'undefined' && 'isVisible' in IntersectionObserverEntry.prototype;
    let hiding = null;
    let showing = null;
    // Paused as unseen, and not seen without a break for `FORGIVEN_MS` since; since when
    // it has been seen without a break.
    let struck = false;
    let seenAt = null;
    // Each watched element's latest report: seen whole (and painted so) or not.
    const whole = new Map();
    const watched = [status, pauseButton].filter(Boolean);
    const observer = new IntersectionObserver((entries) => {
      for (const e of entries) whole.set(e.target, e.intersectionRatio >= 0.99 && (!painted || e.isVisible));
      // The Pause button counts once shown (it is hidden until training starts).
      const seen = watched.every((el) => (el === pauseButton && el.hidden) || whole.get(el) === true);
      if (seen) {
        seenAt ??= performance.now();
        showing ??= setTimeout(() => {
          showing = null;
          clearTimeout(hiding);
          hiding = null;
          if (paused.delete('unseen')) applyPause();
        }, SEEN_AGAIN_MS);
      } else {
        if (seenAt !== null && performance.now() - seenAt >= FORGIVEN_MS) struck = false;
        seenAt = null;
        clearTimeout(showing);
        showing = null;
        hiding ??= setTimeout(() => {
          hiding = null;
          struck = true;
          paused.add('unseen');
          applyPause();
        }, struck ? STRUCK_MS : UNSEEN_MS);
      }
    }, { threshold: [0, 0.99, 1], ...(painted ? { trackVisibility: true, delay: 100 } : {}) });
    for (const el of watched) observer.observe(el);
    rewatch = (el) => {
      observer.unobserve(el);
      observer.observe(el);
    };
  }

  // Automatic pauses: a hidden tab, and a battery that is discharging.
  const onVisibility = () => {
    if (document.hidden) paused.add('hidden'); else paused.delete('hidden');
    applyPause();
  };
  document.addEventListener('visibilitychange', onVisibility);
  if (document.hidden) paused.add('hidden');
  navigator.getBattery?.().then((battery) => {
    const onBattery = () => {
      if (battery.charging) paused.delete('battery'); else paused.add('battery');
      applyPause();
    };
    battery.addEventListener('chargingchange', onBattery);
    onBattery();
  }).catch(() => {});
}

/** What contributing to a task costs, in words: `c` is its description's `cost` (the
 *  contributor page and Shoal's consent window for the widget state it). */
export function costText(c) {
  const model = `a model of ${c.parameters.toLocaleString('en')} parameters`;
  const round = c.round_ms > 0
    ? `Your device trains ${model} without pause, at its own pace, and every ${c.round_ms / 1000} s of training `
    : `Each round your device runs ${c.local_steps_per_round} training steps of ${c.batch} samples on ${model}, then `;
  return `Joining downloads ${fmtBytes(c.download_bytes)} of training data once. ${round}`
    + `sends up to ${fmtBytes(c.bytes_per_round)} of compressed `
    + `updates to up to ${c.max_neighbours} other visitors and receives as much`
    + (c.upload_mb_per_hour > 0
      ? `, within the task's upload budget: at most ${fmtBytes(c.bytes_per_hour)} of updates an hour up `
        + '(with more neighbours your device sends its updates less often, never more), about as much down; '
        + 'a new neighbour also gets the model once, and the models your device sends to neighbours '
        + 'and dashboards that ask are held to half that budget more. '
      : (c.bytes_per_hour == null ? '; the page shows the data per hour once it runs. '
        : ` (${c.round_ms > 0 ? 'at most' : "at the swarm's current pace, up to"} ${fmtBytes(c.bytes_per_hour)} an hour each way). `)
        + `A new neighbour also gets the model once; the models your device sends to neighbours and dashboards that ask are held to ${fmtBytes(c.answer_bytes_per_hour)} an hour more. `)
    + (c.observers > 0 ? `Open dashboards (${c.observers} now) download the model from three contributors every 10 seconds, `
      + `as the change since their last download (about ${fmtBytes(c.observe_bytes)} each): `
      + `up to ${fmtBytes(c.observer_bytes_per_hour)} an hour more from you while they ask you. ` : '')
    + 'Use the throttle to train less often.';
}

/** What the task's differential privacy means for the visitor, in plain words; `local`:
 *  the visitor trains on their own files. */
export function privacyText(dp, local = false) {
  if (!dp && local) {
    return 'Privacy: your files never leave this browser, but the model updates trained on them do, '
      + 'to a few other visitors, as trained: this task adds no noise to them, and an update says '
      + 'something about the data it was trained on.';
  }
  if (!dp) {
    return 'Privacy: this task adds no noise to updates. You train on the task\'s own public data, '
      + 'not on anything of yours; your updates go to a few other visitors as trained.';
  }
  const after = dp.on_budget === 'stop'
    ? 'then this page stops sending updates for this task (it can still follow the model)'
    : 'after that the page keeps contributing and says that the budget has passed';
  return `Privacy: before an update leaves your device it is clipped (L2 norm ${dp.clip}) and `
    + `random noise is added (${dp.noise_multiplier.toFixed(2)} times that norm, on every number). This `
    + 'bounds what the visitors who receive your updates, and anyone who sees the model, can learn '
    + 'about what you trained on (differential privacy; a smaller epsilon is stronger). Over at most '
    + `${dp.rounds.toLocaleString('en')} rounds this holds with epsilon ${dp.epsilon.toFixed(2)} `
    + `and delta ${dp.delta} for everything this browser contributes; ${after}. `
    + 'Clearing this site\'s data starts a new identity and a new count.';
}
