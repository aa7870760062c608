// Small SVG charts for the dashboard: line charts with axes, ticks, labels and a legend;
// bar charts; and the swarm's neighbour graph. Plain DOM, no library.

const NS = 'http://www.w3.org/2000/svg';
export const COLORS = ['#0a7d8c', '#d97706', '#7c3aed', '#dc2626', '#16a34a', '#2563eb', '#db2777', '#4b5563'];

function el(name, attrs = {}, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** About five round tick values covering [lo, hi]. */
function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function frame(svg, { width, height, xLabel, yLabel, title }) {
  svg.replaceChildren();
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('role', 'img');
  if (title) svg.append(el('title', {}, title));
  if (xLabel) svg.append(el('text', { x: width / 2, y: height - 4, 'text-anchor': 'middle', class: 'axis-label' }, xLabel));
  if (yLabel) {
    svg.append(el('text', {
      x: 12, y: height / 2, 'text-anchor': 'middle', class: 'axis-label', transform: `rotate(-90 12 ${height / 2})`,
    }, yLabel));
  }
}

/**
 * A line chart: `series` is `[{name, color, points: [[x, y], ...], dashed}]`.
 * Options: xLabel, yLabel, yMin, yMax, format (y tick text), title.
 */
export function lineChart(svg, series, opts = {}) {
  const width = 520;
  const height = 240;
  const m = { l: 62, r: 14, t: 28, b: 42 };
  frame(svg, { width, height, ...opts });
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) {
    svg.append(el('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'empty' }, 'waiting for data…'));
    return;
  }
  // Not Math.min(...points): spread into arguments, a long series passes the engine's
  // limit on them and throws.
  const least = (i) => all.reduce((m, p) => Math.min(m, p[i]), Infinity);
  const most = (i) => all.reduce((m, p) => Math.max(m, p[i]), -Infinity);
  let [x0, x1] = [least(0), most(0)];
  if (x1 === x0) x1 = x0 + 1;
  let y0 = opts.yMin ?? least(1);
  let y1 = opts.yMax ?? most(1);
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const sy = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  const fmt = opts.format ?? ((v) => String(v));
  const grid = el('g', { class: 'grid' });
  for (const v of ticks(y0, y1)) {
    grid.append(el('line', { x1: m.l, x2: width - m.r, y1: sy(v), y2: sy(v) }));
    grid.append(el('text', { x: m.l - 6, y: sy(v) + 4, 'text-anchor': 'end', class: 'tick' }, fmt(v)));
  }
  for (const v of ticks(x0, x1, 6)) {
    grid.append(el('text', { x: sx(v), y: height - m.b + 16, 'text-anchor': 'middle', class: 'tick' }, String(v)));
  }
  grid.append(el('line', { x1: m.l, x2: m.l, y1: m.t, y2: height - m.b, class: 'axis' }));
  grid.append(el('line', { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: 'axis' }));
  svg.append(grid);
  series.forEach((s, i) => {
    const color = s.color ?? COLORS[i % COLORS.length];
    if (s.points.length) {
      const pts = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(Math.min(y1, Math.max(y0, y))).toFixed(1)}`).join(' ');
      svg.append(el('polyline', {
        points: pts, fill: 'none', stroke: color, 'stroke-width': 2, 'stroke-dasharray': s.dashed ? '5 4' : 'none', 'data-series': s.name,
      }));
    }
    // Legend along the top.
    const lx = m.l + i * 150;
    svg.append(el('line', { x1: lx, x2: lx + 18, y1: 12, y2: 12, stroke: color, 'stroke-width': 3, 'stroke-dasharray': s.dashed ? '5 4' : 'none' }));
    svg.append(el('text', { x: lx + 24, y: 16, class: 'legend' }, s.name));
  });
}

/** A bar chart: `bars` is `[{label, value}]`. Options: yLabel, xLabel, format, title. */
export function barChart(svg, bars, opts = {}) {
  const width = 520;
  const height = 240;
  const m = { l: 62, r: 14, t: 16, b: 56 };
  frame(svg, { width, height, ...opts });
  if (bars.length === 0) {
    svg.append(el('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'empty' }, opts.empty ?? 'nothing yet'));
    return;
  }
  const top = Math.max(...bars.map((b) => b.value), 1e-9);
  const sy = (y) => height - m.b - (y / top) * (height - m.t - m.b);
  const fmt = opts.format ?? ((v) => String(v));
  const g = el('g', { class: 'grid' });
  for (const v of ticks(0, top, 4)) {
    g.append(el('line', { x1: m.l, x2: width - m.r, y1: sy(v), y2: sy(v) }));
    g.append(el('text', { x: m.l - 6, y: sy(v) + 4, 'text-anchor': 'end', class: 'tick' }, fmt(v)));
  }
  g.append(el('line', { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: 'axis' }));
  svg.append(g);
  const slot = (width - m.l - m.r) / bars.length;
  bars.forEach((b, i) => {
    const x = m.l + i * slot + slot * 0.15;
    const y = sy(b.value);
    svg.append(el('rect', {
      x, y, width: slot * 0.7, height: height - m.b - y, fill: b.color ?? COLORS[0], 'data-value': b.value,
    }, undefined));
    svg.append(el('text', {
      x: x + slot * 0.35, y: height - m.b + 14, 'text-anchor': 'middle', class: 'tick',
    }, b.label));
  });
}

/** The neighbour graph: `nodes` `[{id, label, kind}]`, `edges` `[[a, b]]`, on a circle. */
export function graphChart(svg, nodes, edges) {
  const size = 300;
  frame(svg, { width: size, height: size, title: 'neighbour graph' });
  if (nodes.length === 0) {
    svg.append(el('text', { x: size / 2, y: size / 2, 'text-anchor': 'middle', class: 'empty' }, 'no peers online'));
    return;
  }
  const r = size / 2 - 40;
  const pos = new Map(nodes.map((n, i) => {
    const a = (2 * Math.PI * i) / nodes.length - Math.PI / 2;
    return [n.id, [size / 2 + r * Math.cos(a), size / 2 + r * Math.sin(a)]];
  }));
  const seen = new Set();
  for (const [a, b] of edges) {
    const key = a < b ? `${a}-${b}` : `${b}-${a}`;
    if (seen.has(key) || !pos.has(a) || !pos.has(b)) continue;
    seen.add(key);
    const [p, q] = [pos.get(a), pos.get(b)];
    svg.append(el('line', { x1: p[0], y1: p[1], x2: q[0], y2: q[1], class: 'edge' }));
  }
  for (const n of nodes) {
    const [x, y] = pos.get(n.id);
    const fill = { observer: '#9ca3af', paused: '#d97706' }[n.kind] ?? COLORS[0];
    svg.append(el('circle', { cx: x, cy: y, r: 9, fill, class: 'node', 'data-peer': n.id }));
    svg.append(el('text', { x, y: y + (y < size / 2 ? -14 : 22), 'text-anchor': 'middle', class: 'tick' }, n.label));
  }
}
