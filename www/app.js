// The contributor page's main thread: starts the Shoal worker and shows what it reports.
// All computation happens in the worker, so this page stays responsive.

const backend = document.getElementById('backend');
const detail = document.getElementById('detail');

function show(state, text, more = '') {
  backend.dataset.state = state;
  backend.textContent = text;
  detail.textContent = more;
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
  } else if (msg.type === 'error') {
    show('error', 'Shoal could not start in this browser.', msg.message);
  }
});
worker.addEventListener('error', (e) => show('error', 'Shoal could not start in this browser.', e.message));
