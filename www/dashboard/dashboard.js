// The researcher's dashboard: an observer peer in a worker (it downloads the model from
// the swarm and evaluates it on the held-out split; it never trains), plus the server's
// view of the swarm (peers, neighbour graph, each peer's latest numbers; never weights).
import { relaySwarm, fetchTask, fmtBytes } from '../relay.js';
import { lineChart, barChart, graphChart, COLORS } from '../charts.js';

const q = new URLSearchParams(location.search);
const TASK = /^[a-z0-9-]{1,32}$/.test(q.get('task') ?? '') ? q.get('task') : 'digits';
const $ = (id) => document.getElementById(id);
const short = (id) => id.slice(0, 6);
const pct = (v) => `${(v * 100).toFixed(2)}%`;

// What the page shows, also read by the end-to-end test.
const MAX_EVALS = 4000;
const state = { evals: [], rate: [], peers: [], version: null, round: null, target: null, text: false, started: performance.now(), ledger: null };
window.shoalDashboard = state;

const observer = new Worker(new URL('../observer-worker.js', import.meta.url), { type: 'module' });
observer.addEventListener('message', (e) => {
  const m = e.data;
  if (m.type === 'eval') {
    for (const p of m.points) {
      // The observer stepped back to the model its neighbours agree on (the one it held
      // was far ahead of theirs): what it showed of later versions no longer stands.
      if (p.back) state.evals = state.evals.filter((e) => e.version < p.version);
      state.evals.push(p);
    }
    state.evals.sort((a, b) => a.version - b.version);
    // Past MAX_EVALS, every other point of the older half goes: the whole history stays
    // drawn, at a coarser grain the older it is (an open dashboard gets one every 10 s).
    // The first version that met the target is kept whatever goes.
    if (state.evals.length > MAX_EVALS) {
      const half = state.evals.length >> 1;
      const first = state.target == null ? null : state.evals.find(metTarget);
      state.evals = state.evals.filter((p, i) => i >= half || i % 2 === 0 || p === first);
    }
    drawModel();
  } else if (m.type === 'exported') {
    const blob = new Blob([m.bytes], { type: 'application/octet-stream' });
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = `shoal-${TASK}-v${m.version}.safetensors`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    result('ok', `Exported model version ${m.version} (${fmtBytes(m.bytes.length)}).`);
  } else if (m.type === 'error') {
    result('error', m.message);
  }
});

/** Whether the evaluation `p` is at or past the task's target. */
function metTarget(p) {
  const target = state.target ?? 0;
  return state.text ? p.bits_per_byte != null && p.bits_per_byte <= target : p.accuracy >= target;
}

function setState(kind, text) {
  $('state').dataset.state = kind;
  $('state').textContent = text;
}

function result(kind, text) {
  $('control-result').dataset.state = kind;
  $('control-result').textContent = text;
}

function drawModel() {
  const target = state.target ?? 0;
  const x = state.evals.map((p) => p.version);
  const line = (y) => (x.length ? [[x[0], y], [x[x.length - 1], y]] : []);
  if (state.text) {
    // A language model: its held-out loss in bits per byte, against the task's target.
    const bits = state.evals.filter((p) => p.bits_per_byte != null).map((p) => [p.version, p.bits_per_byte]);
    lineChart($('chart-accuracy'), [
      { name: 'held-out bits per byte', points: bits },
      { name: `target ${target.toFixed(2)}`, points: line(target), color: COLORS[1], dashed: true },
    ], { xLabel: 'model version (rounds)', yLabel: 'bits per byte', yMin: 0, format: (v) => v.toFixed(2) });
  } else {
    lineChart($('chart-accuracy'), [
      { name: 'held-out accuracy', points: state.evals.map((p) => [p.version, p.accuracy * 100]) },
      { name: `target ${pct(target)}`, points: line(target * 100), color: COLORS[1], dashed: true },
    ], { xLabel: 'model version (rounds)', yLabel: 'accuracy (%)', yMin: 0, yMax: 100, format: (v) => `${v}%` });
  }
  lineChart($('chart-loss'), [
    { name: 'held-out loss', points: state.evals.map((p) => [p.version, p.loss]), color: COLORS[2] },
  ], { xLabel: 'model version (rounds)', yLabel: 'cross-entropy', yMin: 0, format: (v) => v.toFixed(2) });
  const first = state.target == null ? null : state.evals.find(metTarget);
  $('n-target').textContent = state.target == null ? '–' : first ? `reached at version ${first.version}` : 'not yet';
  const last = state.evals.at(-1);
  if (last) {
    $('n-accuracy').textContent = last.bits_per_byte != null ? last.bits_per_byte.toFixed(3) : pct(last.accuracy);
    $('n-version').textContent = String(last.version);
    state.version = last.version;
    if (last.sample) {
      // Model output is text from the swarm: shown as text, never as markup.
      $('sample-card').hidden = false;
      $('sample-version').textContent = String(last.version);
      $('sample-prompt').textContent = last.sample.prompt;
      $('sample-text').textContent = last.sample.text;
    }
  }
}

// Reports are claims by peers, some of which may lie. The round shown is the server's
// (the median by network of recent reports); the count of trainers is the server's count
// of peers whose last report in 30 s says they train, a claim each (one address's many
// peers each count: a classroom behind one NAT is many trainers); in the totals no peer
// counts for more than OUTLIER times the median peer, and the table marks those that
// claim more.
const OUTLIER = 10;
// The lower median: liars that are half of the reporting peers do not set it.
const median = (xs) => {
  if (!xs.length) return null;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)];
};
const capAt = (xs) => OUTLIER * Math.max(median(xs) ?? 0, 1);
const num = (v) => (Number.isFinite(v) && v >= 0 ? v : 0);

function drawSwarm(view) {
  const fresh = (p) => p.report && p.report_age_s < 30;
  // Contributors are the peers that reported as trainers; the others are joining (or
  // observers, like this page).
  const trainers = view.peers.filter((p) => p.report?.role === 'trainer');
  const observers = new Set(view.peers.filter((p) => p.report?.role === 'observer').map((p) => p.id));
  state.peers = trainers;
  const reporting = trainers.filter((p) => p.report);
  const rateOf = (p) => (fresh(p) && !p.report.paused ? num(p.report.samples_per_s) : 0);
  const bytesOf = (p) => num(p.report.bytes_up) + num(p.report.bytes_down);
  const samplesOf = (p) => num(p.report.samples);
  // The listed peers' caps, for marking them and for their own bars.
  const caps = {
    rate: capAt(reporting.filter((p) => rateOf(p) > 0).map(rateOf)),
    bytes: capAt(reporting.map(bytesOf)),
    samples: capAt(reporting.map(samplesOf)),
  };
  const outliers = new Set(reporting
    .filter((p) => rateOf(p) > caps.rate || bytesOf(p) > caps.bytes || samplesOf(p) > caps.samples)
    .map((p) => p.id));
  state.outliers = [...outliers];
  // The totals are the server's, over every trainer that reported (at most 256 peers are
  // listed), each capped at 10 times the lower-median trainer, its rejections at 10 times
  // the lower-median trainer's updates handled.
  const all = view.totals ?? {};
  const rate = num(all.samples_per_s);
  const bytes = num(all.bytes);
  // Reason names are text from peers: a Map, never an object's keys.
  const rejected = new Map(Object.entries(all.rejected ?? {}).map(([k, v]) => [k, num(v)]));
  state.round = Number.isSafeInteger(view.round) ? view.round : null;
  const t = (performance.now() - state.started) / 1000;
  state.rate.push([Math.round(t), Math.round(rate)]);
  if (state.rate.length > 600) state.rate.shift();

  setState(view.paused ? 'paused' : 'running', view.paused ? 'Task paused' : 'Task running');
  $('n-peers').textContent = String(Number.isSafeInteger(view.trainers) ? view.trainers : trainers.length);
  $('n-round').textContent = state.round == null ? '–' : String(state.round);
  $('n-rate').textContent = rate.toFixed(0);
  $('n-bytes').textContent = fmtBytes(bytes);
  $('n-rejected').textContent = String(Math.round([...rejected.values()].reduce((a, b) => a + b, 0)));

  lineChart($('chart-rate'), [{ name: 'samples/s, all peers', points: state.rate }],
    { xLabel: 'seconds since this page opened', yLabel: 'samples/s', yMin: 0 });
  // Which peers the graph and the per-peer charts show, where not all.
  $('listed').textContent = Number.isSafeInteger(view.total) && view.total > view.peers.length
    ? ` (${view.peers.length} of ${view.total} peers, drawn at random)` : '';
  graphChart($('chart-graph'),
    view.peers.map((p) => ({
      id: p.id, label: short(p.id), kind: observers.has(p.id) ? 'observer' : (p.report?.paused ? 'paused' : 'trainer'),
    })),
    view.peers.flatMap((p) => p.neighbours.map((n) => [p.id, n])));
  barChart($('chart-peer-rate'), trainers.map((p) => ({ label: short(p.id), value: p.report ? Math.min(rateOf(p), caps.rate) : 0 })),
    { yLabel: 'samples/s', empty: 'no reports yet', format: (v) => v.toFixed(0) });
  barChart($('chart-contrib'), trainers.map((p) => ({ label: short(p.id), value: p.report ? Math.min(samplesOf(p), caps.samples) : 0, color: COLORS[4] })),
    { yLabel: 'samples', empty: 'no reports yet', format: (v) => (v >= 1000 ? `${(v / 1000).toFixed(0)}k` : String(v)) });
  barChart($('chart-rejected'), [...rejected].map(([k, v]) => ({ label: k, value: v, color: COLORS[3] })),
    { yLabel: 'updates', empty: 'no update rejected', format: (v) => v.toFixed(0) });

  $('peers').tBodies[0].replaceChildren(...trainers.map((p) => {
    const r = p.report;
    const cells = r
      ? [short(p.id), r.backend, r.version, r.samples_per_s.toFixed(0), r.samples,
        state.privacy || state.local ? '– (private)' : r.loss.toFixed(3),
        r.accuracy == null ? '–' : pct(r.accuracy), fmtBytes(r.bytes_up), fmtBytes(r.bytes_down),
        outliers.has(p.id) ? `outlier (claims over ${OUTLIER}x the median peer)` : (r.paused ? 'paused' : 'training')]
      : [short(p.id), '–', '–', '–', '–', '–', '–', '–', '–', 'joining'];
    const tr = document.createElement('tr');
    if (outliers.has(p.id)) tr.dataset.outlier = 'true';
    for (const c of cells) {
      const td = document.createElement('td');
      td.textContent = String(c);
      tr.append(td);
    }
    return tr;
  }));
}

async function poll() {
  try {
    const r = await fetch(`/api/tasks/${TASK}/swarm`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    drawSwarm(await r.json());
  } catch (e) {
    setState('error', `Server unreachable (${e.message})`);
  }
}

async function control(action) {
  const token = $('token').value;
  sessionStorage.setItem('shoal-admin-token', token);
  const r = await fetch(`/api/tasks/${TASK}/${action}`, { method: 'POST', headers: token ? { authorization: `Bearer ${token}` } : {} });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    result('error', `Refused: ${body.error ?? `HTTP ${r.status}`}`);
    return false;
  }
  return true;
}

$('token').value = sessionStorage.getItem('shoal-admin-token') ?? '';
$('pause-task').addEventListener('click', async () => { if (await control('pause')) { result('ok', 'Task paused: peers stop training.'); poll(); } });
$('resume-task').addEventListener('click', async () => { if (await control('resume')) { result('ok', 'Task resumed.'); poll(); } });
$('export').addEventListener('click', async () => {
  if (state.version == null) { result('error', 'No model downloaded yet.'); return; }
  if (!(await control('export'))) return;
  // Provenance: the export's metadata names the ledger head as it stands now.
  await pollCredits();
  observer.postMessage({ type: 'export', ledgerHead: state.ledger?.head ?? null });
});

fetchTask(TASK).then((d) => {
  state.text = d.task.train.target_bits_per_byte != null;
  if (state.text) {
    state.target = d.task.train.target_bits_per_byte;
    $('task-title').textContent = `${d.task.title}: target held-out loss ${state.target.toFixed(2)} bits per byte`;
    $('l-accuracy').textContent = 'Held-out bits per byte';
    $('c-accuracy').textContent = 'Held-out loss (bits per byte) by model version';
  } else {
    state.target = d.task.train.target_accuracy;
    $('task-title').textContent = `${d.task.title}: target held-out accuracy ${pct(state.target)}`;
  }
  // Differential privacy: the epsilon each contributor reaches at the task's budget.
  const dp = d.privacy;
  state.privacy = dp;
  state.local = d.task.data.source === 'local';
  $('n-privacy').textContent = dp
    ? `ε ${dp.epsilon.toFixed(2)}${dp.on_budget === 'warn' ? ' at the budget (may pass)' : ''}`
    : 'none';
  $('n-privacy').title = dp
    ? `clip ${dp.clip}, noise multiplier ${dp.noise_multiplier.toFixed(3)}, delta ${dp.delta}; `
      + `each contributor's epsilon after ${dp.rounds} rounds, when it ${dp.on_budget === 'stop' ? 'stops' : 'is warned and may go on'}`
    : 'updates are not noised';
  drawModel();
}).catch((e) => setState('error', `Cannot load the task: ${e.message}`));

// The model every 10 s (each download is the change since the last one, int8, uploaded by three volunteers).
observer.postMessage({ type: 'start', task: TASK, everyMs: 10_000 });
// An observer worker that fails to load, or stops taking messages, takes the swarm
// connection with it (relaySwarm's `onStopped`): it would hold neighbours' places.
relaySwarm(observer, TASK, {
  bundle: new URL('../pkg/shoal_dashboard_client.js', import.meta.url).href,
  onStopped: (why) => setState('error', `The model view stopped: ${why}. Reload the page to try again.`),
  onSignaling: (up) => { if (!up) setState('error', 'Lost the signaling server; reconnecting…'); } })
  .catch((e) => setState('error', `Cannot join the swarm: ${e.message}`));
// The leaderboard: credits per visitor key and per site, from the ledger.
async function pollCredits() {
  try {
    const r = await fetch(`/api/tasks/${encodeURIComponent(TASK)}/credits`);
    if (!r.ok) return;
    const c = await r.json();
    state.ledger = { head: c.head, count: c.count, keys: c.keys, sites: c.sites };
    $('ledger-count').textContent = c.count.toLocaleString('en');
    $('ledger-head').textContent = c.head;
    $('ledger-file').href = `/api/tasks/${encodeURIComponent(TASK)}/ledger/file`;
    const rows = (id, items, cells) => {
      const body = document.querySelector(`#${id} tbody`);
      body.replaceChildren(...items.map((item, i) => {
        const tr = document.createElement('tr');
        for (const v of cells(item, i)) {
          const td = document.createElement('td');
          td.textContent = v;
          tr.append(td);
        }
        return tr;
      }));
    };
    rows('credits-keys', c.keys.slice(0, 20), (k, i) => [i + 1, k.key.slice(0, 16), k.credit.toLocaleString('en'), k.rounds]);
    rows('credits-sites', c.sites.slice(0, 20), (s) => [s.site || '(Shoal\'s own page, native peers)', s.credit.toLocaleString('en')]);
  } catch {
    // The next poll will tell.
  }
}

drawModel();
poll();
setInterval(poll, 2000);
pollCredits();
setInterval(pollCredits, 10_000);
