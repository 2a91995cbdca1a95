import * as api from './api.js';
import { el, field, setText, statusBadge, syncRows, table } from './dom.js';
import { num, orDash, time } from './format.js';
import { chartWidth, stackedBar } from './chart.js';

const DEVICE_STATUSES = [
  ['pending', 'wait'], ['moving', 'busy'], ['moved', 'busy'], ['seen', 'ok'], ['stayed', 'off'],
  ['failed', 'bad'], ['rolled_back', 'wait'], ['canceled', 'off'],
];
const SHOWN_DEVICES = 1000;

const deviceCounts = (devices) =>
  DEVICE_STATUSES.filter(([s]) => devices?.[s]).map(([s]) => `${num(devices[s])} ${s.replace('_', ' ')}`).join(' · ') || 'none';

export function mountDistribution(root) {
  const tasks = table({ id: 'distribution-tasks', caption: 'Distribution tasks, newest first',
    columns: ['Task', 'Status', 'Product', 'Policy', 'Destination', 'Batch', 'Gate', 'Devices', 'Created', 'Updated'] });
  root.append(el('h1', {}, 'Distribution'),
    el('p', { class: 'muted' }, 'Tasks that move a product and its devices to other nbhub instances. Start one with ',
      el('code', {}, 'nbhub distribution'), ' or POST /api/v1/distribution/tasks.'),
    el('section', { class: 'panel' }, tasks.table));

  async function refresh() {
    const list = (await api.get('/distribution/tasks')).tasks.slice().reverse();
    syncRows(tasks.tbody, list, (t) => t.task_id, (t) => el('tr', { 'data-task': t.task_id },
      el('td', {}, el('a', { href: `#/distribution/${encodeURIComponent(t.task_id)}` }, t.task_id)),
      el('td', { class: 'status' }, statusBadge(t.status), t.error ? el('span', { class: 'warn small-text', title: t.error }, ' ⚠ error') : null),
      el('td', {}, el('code', {}, t.product_key)),
      el('td', {}, t.policy),
      el('td', {}, orDash(t.instance)),
      el('td', { class: 'num' }, `${t.batch} of ${t.batches}`),
      el('td', {}, t.gate),
      el('td', {}, deviceCounts(t.devices)),
      el('td', {}, time(t.created_at)),
      el('td', {}, time(t.updated_at))),
    { columns: tasks.columns, empty: 'No distribution tasks.' });
  }
  return { refresh };
}

// When each control makes sense, mirroring the server's own checks (it answers 409 otherwise).
const CONTROLS = [
  ['pause', 'Pause', (t) => t.status === 'initializing' || t.status === 'in_progress'],
  ['resume', 'Resume', (t) => t.status === 'paused'],
  ['confirm', 'Confirm batch', (t) => t.gate === 'confirm' && (t.status === 'in_progress' || t.status === 'paused')],
  ['retry', 'Retry failed', (t) => t.status === 'failed' || (t.devices.failed ?? 0) > 0 || (Boolean(t.error) && (t.devices.moving ?? 0) > 0)],
  ['cancel', 'Cancel', (t) => t.status !== 'completed' && t.status !== 'canceled' && !t.devices.moving],
  ['rollback', 'Roll back', (t) => t.policy === 'specified' && (t.devices.moved ?? 0) > 0],
];

export function mountDistributionTask(root, ctx, id) {
  const state = { devices: [], filter: '' };
  const status = el('span', { id: 'dist-status', class: 'badge' }, '…');
  const facts = el('dl', { class: 'details' });
  const error = el('p', { class: 'warn', hidden: true });
  const outcome = el('p', { class: 'muted', role: 'status' });
  const barBox = el('figure', { class: 'chart-box' }, el('figcaption', {}, 'Devices by status'));
  const buttons = CONTROLS.map(([action, label, enabled]) => {
    const button = el('button', { id: `dist-${action}`, type: 'button', disabled: true, class: action === 'cancel' || action === 'rollback' ? 'danger' : '' }, label);
    button.addEventListener('click', () => control(action, label));
    return { button, enabled };
  });
  const filter = el('select', { id: 'dist-device-filter' }, el('option', { value: '' }, 'all'), DEVICE_STATUSES.map(([s]) => el('option', { value: s }, s)));
  filter.addEventListener('change', () => { state.filter = filter.value; renderDevices(); });
  const shown = el('p', { class: 'muted', role: 'status' });
  const devices = table({ id: 'distribution-devices', caption: 'Each device’s result, in batch order',
    columns: ['Device', 'Status', 'Batch', 'Instance', 'Error', 'Updated'] });

  root.append(el('p', { class: 'crumbs' }, el('a', { href: '#/distribution' }, 'Distribution'), ' / task'),
    el('div', { class: 'title-row' }, el('h1', {}, `Distribution task ${id}`), status),
    el('div', { class: 'toolbar', role: 'group', 'aria-label': 'Task controls' }, buttons.map((b) => b.button)),
    outcome, error,
    el('div', { class: 'columns' }, el('section', { class: 'panel' }, facts), el('section', { class: 'panel' }, barBox)),
    el('section', { class: 'panel' }, el('h2', {}, 'Devices'), el('div', { class: 'toolbar' }, field('dist-device-filter', 'Status', filter)),
      shown, el('div', { class: 'scroll tall' }, devices.table)));

  async function control(action, label) {
    if ((action === 'cancel' || action === 'rollback') && !confirm(`${label} distribution task ${id}?`)) return;
    for (const b of buttons) b.button.disabled = true;
    try {
      const answer = await api.post(api.path`/distribution/tasks/${id}/${action}`);
      if (action === 'rollback') {
        setText(outcome, `Rollback: ${answer.rolled_back} devices taken back, ${answer.stayed} stayed at the destination.`);
        render(answer.task);
      } else {
        setText(outcome, `${label}: done.`);
        render(answer);
      }
      ctx.refreshNow();
    } catch (e) {
      ctx.showError(e);
      ctx.refreshNow();
    }
  }

  async function refresh() {
    const [task, list] = await Promise.all([
      api.get(api.path`/distribution/tasks/${id}`),
      api.get(api.path`/distribution/tasks/${id}/devices`),
    ]);
    render(task);
    state.devices = list.devices;
    renderDevices();
  }

  function render(t) {
    setText(status, t.status);
    status.className = `badge s-${t.status}`;
    for (const b of buttons) b.button.disabled = !b.enabled(t);
    error.hidden = !t.error;
    setText(error, t.error ?? '');
    const signature = JSON.stringify(t);
    if (facts.dataset.sig !== signature) {
      facts.dataset.sig = signature;
      facts.replaceChildren(...[
        ['Product', el('code', {}, t.product_key)],
        ['Policy', t.policy],
        ['Destination', orDash(t.instance ?? (t.policy === 'nearest' ? 'nearest instance per device' : null))],
        ['Batch', el('span', { id: 'dist-batch' }, `${t.batch} of ${t.batches}`), ` (${t.batch_size} devices each)`],
        ['Gate', el('span', { id: 'dist-gate' }, t.gate === 'confirm' ? 'confirm (operator)' : 'online (seen at destination)')],
        ['Batch timeout', t.batch_timeout_s ? `${t.batch_timeout_s} s, then ${t.on_timeout}` : 'none'],
        ['Devices', el('span', { id: 'dist-counts' }, deviceCounts(t.devices))],
        ['Created', time(t.created_at)],
        ['Updated', time(t.updated_at)],
      ].flatMap(([term, ...value]) => [el('dt', {}, term), el('dd', {}, ...value)]));
    }
    const bar = stackedBar({ id: 'dist-chart', title: 'Devices by status', width: chartWidth(barBox),
      parts: DEVICE_STATUSES.map(([s, group]) => ({ label: s.replace('_', ' '), value: t.devices[s] ?? 0, cls: `g-${group} st-${s}` })) });
    const old = barBox.querySelector('svg');
    if (old) old.replaceWith(bar);
    else barBox.append(bar);
    barBox.querySelector('ul')?.remove();
    barBox.append(el('ul', { class: 'legend' }, DEVICE_STATUSES.filter(([s]) => t.devices[s]).map(([s, group]) =>
      el('li', {}, el('span', { class: `swatch g-${group} st-${s}` }), `${s.replace('_', ' ')} ${t.devices[s]}`))));
  }

  function renderDevices() {
    const matching = state.devices.filter((d) => !state.filter || d.status === state.filter);
    const page = matching.slice(0, SHOWN_DEVICES);
    setText(shown, matching.length > page.length ? `Showing ${page.length} of ${num(matching.length)} devices.` : `${num(matching.length)} devices.`);
    syncRows(devices.tbody, page, (d) => d.device_name, (d) => el('tr', { 'data-device': d.device_name },
      el('td', {}, d.device_name),
      el('td', { class: 'status' }, el('span', { class: `badge g-${DEVICE_STATUSES.find(([s]) => s === d.status)?.[1] ?? 'wait'}` }, d.status.replace('_', ' '))),
      el('td', { class: 'num' }, String(d.batch)),
      el('td', {}, orDash(d.instance)),
      el('td', { class: 'reason' }, orDash(d.error)),
      el('td', {}, time(d.updated_at))),
    { columns: devices.columns, empty: 'No devices.' });
  }

  return { refresh };
}
