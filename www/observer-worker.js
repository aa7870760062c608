// The dashboard's worker: an observer peer of the swarm. It downloads the current model
// from a neighbour every few seconds, evaluates it on the task's held-out split, and
// writes the safetensors export on request. It never trains or sends updates.
// The researcher's bundle: the contributor's plus the observer (visitors never load it).
import init, { SwarmObserver, EarlyEvents, sha256Hex } from './pkg/shoal_dashboard_client.js';
import { fetchTaskFiles } from './data.js';

let observer = null;
// Transport events before the observer exists (bounded per neighbour, as its inbox).
let early = null;
// The task's parameter count, once its description is in (bounds `early`).
let parameters = NaN;
const loading = init();
const post = (m, transfer) => self.postMessage(m, transfer ?? []);
const errorText = (e) => String(e && e.message ? e.message : e);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// Tells the page a message is in the observer's bounded inbox (relay.js, `MAX_UNTAKEN`).
const taken = (m) => { if (m.data) post({ type: 'taken', bytes: m.data.length }); };

async function observe(task, everyMs) {
  await loading;
  const r = await fetch(`/api/tasks/${encodeURIComponent(task)}`);
  if (!r.ok) throw new Error(`the server does not offer the task "${task}" (HTTP ${r.status})`);
  const desc = await r.json();
  // What neighbours send meanwhile is bounded by the task's largest message.
  parameters = desc.cost?.parameters ?? NaN;
  early?.setParameters(parameters);
  const files = await fetchTaskFiles(desc, sha256Hex);
  observer = SwarmObserver.create(JSON.stringify(desc.task), files, everyMs);
  if (early) observer.adopt(early);
  early?.free();
  early = null;
  post({ type: 'ready' });
  for (;;) {
    const points = JSON.parse(observer.tick());
    for (const [to, data] of observer.outgoing()) post({ type: 'send', peer: to, data }, [data.buffer]);
    for (const to of observer.takeDrops()) post({ type: 'drop', peer: to });
    const report = observer.takeReport();
    if (report) post({ type: 'report', report });
    if (points.length) post({ type: 'eval', points });
    await sleep(100);
  }
}

self.addEventListener('message', (event) => {
  const m = event.data;
  try {
    if (m.type === 'start' && !observer) {
      observe(m.task, m.everyMs ?? 10_000).catch((e) => post({ type: 'error', message: errorText(e) }));
    } else if (m.type === 'net' && m.kind !== 'task_state') {
      if (observer) {
        try {
          observer.event(m.kind, m.peer, m.data);
        } finally {
          taken(m);
        }
      } else {
        loading.then(() => {
          if (observer) return observer.event(m.kind, m.peer, m.data);
          if (!early) {
            early = new EarlyEvents();
            early.setParameters(parameters);
          }
          early.event(m.kind, m.peer, m.data);
        }).catch((e) => post({ type: 'error', message: errorText(e) })).finally(() => taken(m));
      }
    } else if (m.type === 'export') {
      const bytes = observer.exportSafetensors(m.ledgerHead ?? undefined);
      post({ type: 'exported', bytes, version: observer.version() }, [bytes.buffer]);
    }
  } catch (e) {
    post({ type: 'error', message: errorText(e) });
  }
});
