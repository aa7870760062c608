// The WebRTC side of a browser peer. Browsers offer RTCPeerConnection only on the main
// thread, so the page holds the swarm connection and relays bytes between it and the
// worker that trains (or observes). Nothing here computes; it only moves bytes.

// The contributor's bundle; the dashboard passes its own (`bundle`), which holds the same
// transport, so that its page and its worker share one download.
const CONTRIBUTOR_BUNDLE = new URL('./pkg/shoal_web_client.js', import.meta.url).href;

// Bytes of neighbours' messages handed to the worker and not yet taken by it (the worker
// answers `{type:'taken', bytes}` once a message is in its peer's bounded inbox). A worker
// reads its messages only between two ticks of training, so without this bound a
// neighbour could fill the browser's message queue for as long as a tick lasts. Past it
// the relay stops reading the swarm, whose own inbox then bounds (and counts) what waits:
// one message of any size goes through when nothing is untaken. Each message is charged
// `MESSAGE_COST` bytes beyond its length (what posting it costs, however short it is), so
// a flood of empty or tiny messages is bounded too: at most 16,384 wait.
export const MAX_UNTAKEN = 16 << 20;
export const MESSAGE_COST = 1024;
// A worker that takes nothing for this long while messages wait has stopped (it failed
// to load, or died): the relay then leaves the swarm rather than hold neighbours' places
// with a peer that does not train. A working worker takes messages between ticks of
// training, a few seconds apart at most.
export const TAKEN_DEADLINE_MS = 60_000;

/**
 * Joins `task`'s swarm and wires it to `worker`: transport events go to the worker as
 * `{type:'net', kind, peer, data}` (and `{type:'net', kind:'task_state', paused}`); the
 * worker's `{type:'send'}`, `{type:'report'}` and `{type:'receipt'}` messages go out,
 * and `{type:'drop', peer}` closes a neighbour that broke the protocol.
 * `onSignaling(up)` is told when the signaling server connection comes and goes, and
 * `onStopped(why)` once the relay leaves the swarm because its worker failed (an `error`
 * event) or took no message for `TAKEN_DEADLINE_MS`. With
 * `secret` (the visitor's key, 64 hex digits) the connection proves that key to the
 * server, so that the receipts the visitor signs and earns count in the task's ledger.
 * `bundle` is the URL of the wasm bundle's JS glue to run the transport with. The worker
 * answers each `net` message's bytes with `{type:'taken', bytes}` (`MAX_UNTAKEN`).
 * `stats` (an object) is kept up to date: `untaken` and `mostUntaken` bytes, and
 * `dropped()`, the neighbours' messages the page's inbox dropped. `parameters`: the
 * task's parameter count (its description's `cost.parameters`; fetched when not given),
 * which bounds the messages the page takes from neighbours (docs/protocol.md, "Framing"),
 * and `uploadMbPerHour` (its `task.learn.upload_mb_per_hour`), which with it bounds the
 * bytes each neighbour may send (both fetched when `parameters` is not given).
 * `revision`: the task's revision the worker trains (its description's `revision`; also
 * fetched when `parameters` is not given). The connection names it, and once the server
 * runs another (the task or its data changed, and it restarted) it refuses the
 * connection with `task_changed` and the relay stops.
 */
export async function relaySwarm(worker, task, { onSignaling = () => {}, onStopped = () => {}, secret = null, bundle = CONTRIBUTOR_BUNDLE, stats = {}, parameters, uploadMbPerHour, revision } = {}) {
  const shoal = await import(bundle);
  await shoal.default();
  const described = parameters === undefined ? await fetchTask(task).catch(() => null) : null;
  const params = parameters ?? described?.cost?.parameters;
  const budget = uploadMbPerHour ?? described?.task?.learn?.upload_mb_per_hour;
  const rev = revision ?? described?.revision;
  const revParam = typeof rev === 'string' && /^[0-9a-f]{32}$/.test(rev) ? `&revision=${rev}` : '';
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const swarm = shoal.Swarm.connect(`${scheme}://${location.host}/ws/${task}?v=2${siteParam()}${revParam}`,
    Number.isSafeInteger(params) && params > 0 ? params : undefined,
    Number.isSafeInteger(budget) && budget > 0 ? budget : undefined);
  // Before any message is read (this task has not yielded yet): the welcome's nonce is
  // signed as soon as it arrives.
  if (secret) swarm.setIdentity(Uint8Array.from(secret.match(/../g), (h) => parseInt(h, 16)));
  Object.assign(stats, { untaken: 0, mostUntaken: 0, dropped: () => swarm.inboxDropped() });
  let taken = null;
  let stopped = false;
  const stop = (why) => {
    if (stopped) return;
    stopped = true;
    try {
      swarm.close();
    } catch {
      // Closed already.
    }
    // A worker that comes back later must not train on alone, unseen.
    worker.terminate();
    onStopped(why);
  };
  worker.addEventListener('error', () => stop('its worker failed'));
  worker.addEventListener('message', (event) => {
    const m = event.data;
    try {
      if (m.type === 'taken') {
        stats.untaken = Math.max(0, stats.untaken - m.bytes - MESSAGE_COST);
        taken?.();
        taken = null;
      } else if (m.type === 'send') swarm.send(m.peer, m.data);
      else if (m.type === 'report') swarm.report(m.report);
      else if (m.type === 'receipt') swarm.receipt(m.receipt);
      else if (m.type === 'drop') swarm.dropNeighbour(m.peer);
    } catch {
      // A full queue or a neighbour that just left: the message is dropped, and the
      // swarm's deadlines make sure nobody waits for it.
    }
  });
  (async () => {
    while (!stopped) {
      const e = await swarm.next();
      if (stopped) return;
      // One event that cannot be handed on must not stop the relay: the worker would
      // train on alone, hearing nothing more from its neighbours.
      try {
        if (e.type === 'signaling') onSignaling(e.state === 'up');
        else if (e.type === 'peer_up' || e.type === 'peer_down') {
          worker.postMessage({ type: 'net', kind: e.type, peer: e.peer });
        } else if (e.type === 'message') {
          const n = e.data.length + MESSAGE_COST;
          while (stats.untaken > 0 && stats.untaken + n > MAX_UNTAKEN) {
            const answered = await Promise.race([
              new Promise((resolve) => { taken = () => resolve(true); }),
              new Promise((resolve) => setTimeout(resolve, TAKEN_DEADLINE_MS, false)),
            ]);
            if (!answered) {
              stop(`its worker took no message for ${TAKEN_DEADLINE_MS / 1000} s`);
              return;
            }
          }
          stats.untaken += n;
          stats.mostUntaken = Math.max(stats.mostUntaken, stats.untaken);
          worker.postMessage({ type: 'net', kind: 'message', peer: e.from, data: e.data }, [e.data.buffer]);
        } else if (e.type === 'task_state') {
          worker.postMessage({ type: 'net', kind: 'task_state', paused: e.paused });
        } else if (e.type === 'task_changed') {
          // Training on would put updates of the old task among peers of the new one
          // (under other privacy settings, say): the visitor must see the new one first.
          stop('the task changed on the server since this page loaded it, or Shoal did (see what it asks now)');
          return;
        }
      } catch (err) {
        console.error(`shoal: relaying a ${e.type} event failed: ${err?.message ?? err}`);
      }
    }
  })().catch((err) => {
    if (stopped) return;
    console.error(`shoal: the relay stopped: ${err?.message ?? err}`);
    onSignaling(false);
  });
  return swarm;
}

/**
 * In the widget's frame, the site the visitor is on, as the browser reports it (not as
 * the host page says): `&site=HOST` for the server's ledger; nothing on Shoal's own page.
 * The top-level site, the one in the address bar, not the frame's embedder: a site that
 * frames another site's page with the widget (and hides the frame) is named itself, and
 * one that wraps the widget in an origin-less `data:` frame to go unnamed is named too. A
 * frame whose ancestors the browser does not name (Firefox) says `site=unknown`: never
 * Shoal's own page.
 */
function siteParam() {
  if (window === window.top) return '';
  const ancestors = location.ancestorOrigins;
  const top = ancestors?.[ancestors.length - 1];
  try {
    const host = new URL(top).host.toLowerCase();
    if (/^[a-z0-9.:-]{1,253}$/.test(host)) return `&site=${encodeURIComponent(host)}`;
  } catch {
    // No origin to name: below.
  }
  return '&site=unknown';
}

/** Fetches a task's description (`{task, files, cost}`) with a clear error. */
export async function fetchTask(task) {
  let r;
  try {
    r = await fetch(`/api/tasks/${encodeURIComponent(task)}`);
  } catch {
    throw new Error('the Shoal server cannot be reached');
  }
  if (!r.ok) throw new Error(`the server does not offer the task "${task}" (HTTP ${r.status})`);
  return r.json();
}

export const fmtBytes = (n) => {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(0)} kB`;
  return `${n} B`;
};
