// The contributor page's main thread: starts the Shoal worker, asks for consent, and
// shows what the worker reports. All computation happens in the worker, so this page
// stays responsive.

const backend = document.getElementById('backend');
const detail = document.getElementById('detail');
const consent = document.getElementById('consent');
const stats = document.getElementById('stats');
const TASK = 'digits';

function show(state, text, more = '') {
  backend.dataset.state = state;
  backend.textContent = text;
  detail.textContent = more;
}

// The visitor's identity: an ed25519 secret made once and kept in this browser, so that
// contributions across visits are signed by the same key.
function secret() {
  let s = localStorage.getItem('shoal-identity');
  if (!/^[0-9a-f]{64}$/.test(s ?? '')) {
    const bytes = crypto.getRandomValues(new Uint8Array(32));
    s = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
    localStorage.setItem('shoal-identity', s);
  }
  return s;
}

const fmtBytes = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(0)} kB`);

// Every round's progress, for anyone (and any test) who wants the history.
window.shoalProgress = [];

function render(p) {
  const acc = p.accuracy == null ? '–' : `${(p.accuracy * 100).toFixed(2)}%`;
  const rows = {
    round: p.round, phase: p.phase, 'local steps': p.local_steps, samples: p.samples,
    loss: p.loss.toFixed(4), 'held-out accuracy': acc, peers: p.peers,
    'bytes up': fmtBytes(p.bytes_up), 'bytes down': fmtBytes(p.bytes_down),
  };
  stats.replaceChildren(...Object.entries(rows).flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = String(v);
    dd.dataset.key = k;
    return [dt, dd];
  }));
}

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });

worker.addEventListener('message', (event) => {
  const msg = event.data;
  if (msg.type === 'probe') {
    const r = msg.result;
    if (r.backend === 'gpu') {
      const soft = r.adapter.software ? ' (a software emulation: training will be slow)' : '';
      show('gpu', `WebGPU: ${r.adapter.description}${soft}`,
        `Backend ${r.adapter.backend}, device type ${r.adapter.device_type}; compute check: ${r.check}.`);
    } else {
      show('cpu', 'No WebGPU adapter: Shoal will train on your CPU.', r.reason);
    }
    consent.disabled = false;
  } else if (msg.type === 'joined') {
    consent.textContent = 'Contributing — thank you';
  } else if (msg.type === 'send') {
    try {
      swarm?.send(msg.peer, msg.data);
    } catch (e) {
      // A full queue or a neighbour that just left: the update is dropped, and the
      // swarm's deadlines make sure nobody waits for it.
    }
  } else if (msg.type === 'progress') {
    const p = msg.progress;
    if (p.closed) window.shoalProgress.push({ round: p.round, accuracy: p.accuracy, peers: p.peers });
    render(p);
  } else if (msg.type === 'error') {
    show('error', 'Shoal could not start in this browser.', msg.message);
  }
});
worker.addEventListener('error', (e) => show('error', 'Shoal could not start in this browser.', e.message));

// The WebRTC side of the peer: browsers offer RTCPeerConnection only on the main thread,
// so the page holds the swarm connection and relays its events to the worker. Nothing
// here computes; it only moves bytes.
let swarm = null;

async function connect() {
  const shoal = await import('./pkg/shoal_web_client.js');
  await shoal.default();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  swarm = shoal.Swarm.connect(`${scheme}://${location.host}/ws/${TASK}?v=1`);
  for (;;) {
    const e = await swarm.next();
    if (e.type === 'peer_up' || e.type === 'peer_down') {
      worker.postMessage({ type: 'net', kind: e.type, peer: e.peer });
    } else if (e.type === 'message') {
      worker.postMessage({ type: 'net', kind: 'message', peer: e.from, data: e.data }, [e.data.buffer]);
    }
  }
}

consent.addEventListener('click', () => {
  consent.disabled = true;
  consent.textContent = 'Joining the swarm…';
  // `?backend=cpu` trains on the CPU even where WebGPU exists (slow software adapters).
  const only = new URLSearchParams(location.search).get('backend');
  worker.postMessage({ type: 'start', task: TASK, secret: secret(), backend: only === 'cpu' ? 'cpu' : null });
  connect().catch((e) => show('error', 'Shoal lost its connection to the swarm.', String(e.message ?? e)));
});
