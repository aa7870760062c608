// "Try the model" on the contributor page: a prompt box for a language model, a drawing
// pad for an image classifier with one grey channel. The model that answers is the one
// this browser's peer holds, run in the training worker (off the main thread) between two
// of its ticks; what the visitor types or draws is never sent anywhere.

const $ = (id) => document.getElementById(id);

/** Wires the card for the task `description` (from /api/tasks/NAME) to `worker`. */
export function tryTheModel(worker, description) {
  const card = $('try-card');
  if (!card) return;
  const task = description.task;
  const [h, w, channels] = task.model.input;
  const text = Boolean(task.data?.train?.text) || task.data?.local?.kind === 'text';
  if (!text && channels !== 1) return; // nothing to draw colour pictures with, yet
  card.hidden = false;
  const status = $('try-status');
  let next = 1;
  let waiting = 0;
  const ask = (kind, input) => {
    waiting = next++;
    status.textContent = 'The model is thinking (between two training rounds)…';
    worker.postMessage({ type: 'try', id: waiting, kind, input }, [input.buffer]);
  };
  worker.addEventListener('message', (event) => {
    const m = event.data;
    if (m.type !== 'tried' || m.id !== waiting) return;
    if (m.error) {
      status.textContent = m.error;
      return;
    }
    status.textContent = `Model version ${m.result.version}, answered in ${Math.round(m.ms)} ms in the worker.`;
    if (text) showText(m.result);
    else showClasses(m.result);
  });

  // The prompt last sent.
  let sent = '';
  if (text) {
    $('try-text').hidden = false;
    const prompt = $('try-prompt');
    $('try-go').addEventListener('click', () => {
      const bytes = new TextEncoder().encode(prompt.value).slice(-1024);
      // What the model continues: the prompt as sent (its last 1,024 bytes), not the box
      // as it reads when the answer comes (the visitor may have typed on meanwhile).
      sent = new TextDecoder().decode(bytes);
      ask('text', bytes);
    });
  }
  function showText(r) {
    $('try-output-prompt').textContent = sent;
    $('try-output-text').textContent = r.text;
  }
  function showClasses(r) {
    const ranked = r.probabilities.map((p, c) => [c, p]).sort((a, b) => b[1] - a[1]).slice(0, 3);
    $('try-guess').textContent = `The model reads a ${ranked[0][0]} (${(ranked[0][1] * 100).toFixed(1)}%)`;
    $('try-probs').textContent = ranked.slice(1).map(([c, p]) => `${c}: ${(p * 100).toFixed(1)}%`).join(', ');
  }

  if (!text) {
    $('try-image').hidden = false;
    drawingPad($('pad'), h, w, (grey) => ask('image', grey));
  }
}

/**
 * A canvas to draw on with a mouse, pen or finger (white on black, as the digits are);
 * after each stroke `done` gets the drawing as `h * w` grey bytes, framed as MNIST frames
 * its digits: the drawing's bounding box scaled to fit 20/28 of the frame, centred.
 */
function drawingPad(canvas, h, w, done) {
  const ctx = canvas.getContext('2d');
  const clear = () => {
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  ctx.strokeStyle = '#fff';
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  ctx.lineWidth = canvas.width / 12;
  let drawing = false;
  let box = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * (canvas.width / r.width), (e.clientY - r.top) * (canvas.height / r.height)];
  };
  const grow = ([x, y]) => {
    const m = ctx.lineWidth / 2;
    box = box ?? { x0: x, y0: y, x1: x, y1: y };
    box = { x0: Math.min(box.x0, x - m), y0: Math.min(box.y0, y - m), x1: Math.max(box.x1, x + m), y1: Math.max(box.y1, y + m) };
  };
  canvas.addEventListener('pointerdown', (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    const p = at(e);
    grow(p);
    ctx.beginPath();
    ctx.moveTo(...p);
    ctx.lineTo(...p);
    ctx.stroke();
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!drawing) return;
    const p = at(e);
    grow(p);
    ctx.lineTo(...p);
    ctx.stroke();
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    done(frame());
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  $('pad-clear').addEventListener('click', () => {
    clear();
    box = null;
    $('try-guess').textContent = '';
    $('try-probs').textContent = '';
  });

  const small = document.createElement('canvas');
  small.width = w;
  small.height = h;
  const sctx = small.getContext('2d', { willReadFrequently: true });
  function frame() {
    sctx.fillStyle = '#000';
    sctx.fillRect(0, 0, w, h);
    const x0 = Math.max(0, box.x0);
    const y0 = Math.max(0, box.y0);
    const bw = Math.min(canvas.width, box.x1) - x0;
    const bh = Math.min(canvas.height, box.y1) - y0;
    const scale = (Math.min(w, h) * 20 / 28) / Math.max(bw, bh);
    const dw = bw * scale;
    const dh = bh * scale;
    sctx.drawImage(canvas, x0, y0, bw, bh, (w - dw) / 2, (h - dh) / 2, dw, dh);
    const rgba = sctx.getImageData(0, 0, w, h).data;
    const grey = new Uint8Array(w * h);
    for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
    return grey;
  }
}
