// Inline SVG charts. The viewBox scales with the page; every chart carries a <title> and an
// aria-label that states the numbers, so it reads without the picture.

const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// Drawn at the width it is shown at, so its text stays at the page's size.
export function chartWidth(container) {
  return Math.max(480, Math.round(container.clientWidth) || 760);
}

function frame(id, title, label, width, height) {
  return s('svg', { id, class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': label },
    s('title', {}, title));
}

// 1-2-5 steps, so the axis reads in round numbers.
function niceStep(max, ticks) {
  const raw = Math.max(max, 1) / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  return Math.max(1, step);
}

const MINUTE = 60_000;
const TIME_STEPS = [1 / 6, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080].map((m) => m * MINUTE);

function timeLabel(t, span, step) {
  const d = new Date(t);
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: step < MINUTE ? '2-digit' : undefined, hour12: false });
  return span > 86_400_000 ? `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${hm}` : hm;
}

/**
 * Lines over time. series: [{ label, cls, points: [[ms, value]], step, area }]; a step series
 * holds its value until the next point and up to `to`.
 */
export function timeChart({ id, title, label, from, to, series, yLabel, xLabel = 'time (local)', width = 760, height = 230, pointTitle }) {
  const m = { l: 52, r: 16, t: series.length > 1 ? 28 : 14, b: 42 };
  const w = width - m.l - m.r;
  const h = height - m.t - m.b;
  const span = Math.max(to - from, 1000);
  const max = Math.max(0, ...series.flatMap((se) => se.points.map(([, v]) => v)));
  const yStep = niceStep(max, 5);
  const yMax = Math.max(yStep, Math.ceil(max / yStep) * yStep);
  const x = (t) => m.l + ((t - from) / span) * w;
  const y = (v) => m.t + h - (v / yMax) * h;
  const svg = frame(id, title, label, width, height);

  const grid = s('g', { class: 'axis' });
  for (let v = 0; v <= yMax + 1e-9; v += yStep) {
    grid.append(s('line', { x1: m.l, x2: m.l + w, y1: y(v), y2: y(v), class: v === 0 ? 'base' : 'grid' }),
      s('text', { x: m.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, String(v)));
  }
  const tStep = TIME_STEPS.find((st) => span / st <= 7) ?? TIME_STEPS.at(-1);
  const offset = new Date(from).getTimezoneOffset() * MINUTE;
  for (let t = Math.ceil((from - offset) / tStep) * tStep + offset; t <= to; t += tStep) {
    grid.append(s('line', { x1: x(t), x2: x(t), y1: m.t + h, y2: m.t + h + 4, class: 'base' }),
      s('text', { x: x(t), y: m.t + h + 17, 'text-anchor': 'middle' }, timeLabel(t, span, tStep)));
  }
  grid.append(s('line', { x1: m.l, x2: m.l, y1: m.t, y2: m.t + h, class: 'base' }),
    s('text', { x: m.l + w / 2, y: height - 6, 'text-anchor': 'middle', class: 'axis-title' }, xLabel),
    s('text', { x: 12, y: m.t + h / 2, 'text-anchor': 'middle', class: 'axis-title', transform: `rotate(-90 12 ${m.t + h / 2})` }, yLabel));
  svg.append(grid);

  for (const se of series) {
    const pts = se.points.map(([t, v]) => [x(t), y(v)]);
    if (pts.length === 0) continue;
    let d = `M${pts[0][0].toFixed(1)},${pts[0][1].toFixed(1)}`;
    for (let i = 1; i < pts.length; i++) {
      d += se.step ? `H${pts[i][0].toFixed(1)}V${pts[i][1].toFixed(1)}` : `L${pts[i][0].toFixed(1)},${pts[i][1].toFixed(1)}`;
    }
    if (se.step) d += `H${x(to).toFixed(1)}`;
    const end = se.step ? x(to) : pts.at(-1)[0];
    if (se.area) svg.append(s('path', { class: `area ${se.cls}`, d: `${d}L${end.toFixed(1)},${y(0)}L${pts[0][0].toFixed(1)},${y(0)}Z` }));
    svg.append(s('path', { class: `line ${se.cls}`, d }));
  }

  if (series.length > 1) {
    let lx = m.l;
    for (const se of series) {
      svg.append(s('rect', { x: lx, y: 8, width: 12, height: 4, class: `key ${se.cls}` }),
        s('text', { x: lx + 16, y: 14, class: 'legend' }, se.label));
      lx += 24 + se.label.length * 7;
    }
  }

  // Hover targets, one per point of the first series, for the exact value.
  if (pointTitle && series[0]) {
    const pts = series[0].points;
    const slot = pts.length > 1 ? w / pts.length : w;
    const hover = s('g', { class: 'hover' });
    for (const [t, v] of pts) {
      hover.append(s('rect', { x: x(t) - slot / 2, y: m.t, width: slot, height: h }, s('title', {}, pointTitle(t, v))));
    }
    svg.append(hover);
  }
  return svg;
}

/** One horizontal bar split into parts: [{ label, value, cls }]. */
export function stackedBar({ id, title, parts, width = 760, height = 26 }) {
  const total = parts.reduce((n, p) => n + p.value, 0);
  const label = `${title}: ${parts.filter((p) => p.value).map((p) => `${p.label} ${p.value}`).join(', ') || 'none'}`;
  const svg = frame(id, title, label, width, height);
  svg.append(s('rect', { x: 0, y: 0, width, height, class: 'track' }));
  let at = 0;
  for (const p of parts) {
    if (!p.value) continue;
    const w = (p.value / total) * width;
    svg.append(s('rect', { x: at, y: 0, width: w, height, class: `seg ${p.cls}` }, s('title', {}, `${p.label}: ${p.value}`)));
    at += w;
  }
  return svg;
}

/**
 * A cell's load against its capacity: segments per coverage level, a tick every 10 units and
 * a marker at the peak. segments: [{ label, units, cls }].
 */
export function capacityBar({ title, capacity, segments, peak, width = 220, height = 18 }) {
  const used = segments.reduce((n, sg) => n + sg.units, 0);
  const label = `${title}: ${used} of ${capacity} units` +
    segments.filter((sg) => sg.units).map((sg) => `, ${sg.label} ${sg.units}`).join('') + (peak ? `, peak ${peak}` : '');
  const svg = frame(undefined, title, label, width, height);
  svg.classList.add('capacity');
  const x = (u) => (Math.min(u, capacity) / capacity) * width;
  svg.append(s('rect', { x: 0, y: 2, width, height: height - 4, class: 'track' }));
  let at = 0;
  for (const sg of segments) {
    if (!sg.units) continue;
    svg.append(s('rect', { x: x(at), y: 2, width: x(at + sg.units) - x(at), height: height - 4, class: `seg ${sg.cls}` },
      s('title', {}, `${sg.label}: ${sg.units} units`)));
    at += sg.units;
  }
  for (let u = 10; u < capacity; u += 10) svg.append(s('line', { x1: x(u), x2: x(u), y1: 2, y2: 5, class: 'tick' }));
  if (peak) {
    svg.append(s('line', { x1: x(peak), x2: x(peak), y1: 0, y2: height, class: 'peak' }, s('title', {}, `peak ${peak} units`)));
  }
  return svg;
}
