import * as api from './api.js';
import { el, field, formError, options, setText, showFormError, statusBadge, syncRows, table } from './dom.js';
import { errorText, num, orDash, time, unixMsTime } from './format.js';
import { capacityBar, chartWidth, stackedBar, timeChart } from './chart.js';

// Task device states in the order a device goes through them, with the colour group each shows in.
const STATES = [
  ['waiting_online', 'wait'], ['querying_version', 'wait'], ['waiting_radio', 'wait'], ['waiting_slot', 'wait'],
  ['notified', 'busy'], ['downloading', 'busy'], ['downloaded', 'busy'], ['upgrading', 'busy'],
  ['succeeded', 'ok'], ['failed', 'bad'], ['canceled', 'off'],
];
const FINAL = new Set(['succeeded', 'failed', 'canceled']);
const SHOWN_DEVICES = 500;

function stateBadge(stateName) {
  const group = STATES.find(([s]) => s === stateName)?.[1] ?? 'wait';
  return el('span', { class: `badge g-${group}` }, stateName.replace(/_/g, ' '));
}

function countsSummary(counts) {
  const total = Object.values(counts ?? {}).reduce((n, c) => n + c, 0);
  const done = (counts?.succeeded ?? 0) + (counts?.failed ?? 0) + (counts?.canceled ?? 0);
  return `${num(counts?.succeeded ?? 0)} succeeded · ${num(counts?.failed ?? 0)} failed · ${num(total - done)} open · ${num(total)} total`;
}

function unavailable(err) {
  return el('p', { class: 'panel-error' }, `Unavailable: ${errorText(err)}`);
}

// The cells panel, shared by the upgrades page and a task's page (cell load is global).
function cellsPanel() {
  const cells = table({ id: 'cells', caption: 'Radio cells with downloads in progress or devices waiting for a slot',
    columns: ['Cell', 'Used', 'Limit', 'Load', 'Level 0', 'Level 1', 'Level 2', 'Level unknown', 'Waiting', 'Peak'] });
  const rule = el('p', { class: 'muted' });
  const note = el('div');
  const node = el('section', { id: 'cells-panel', class: 'panel' }, el('h2', {}, 'Cells'), rule, el('ul', { class: 'legend' },
    [['lvl0', 'level 0'], ['lvl1', 'level 1'], ['lvl2', 'level 2'], ['lvlx', 'level unknown']].map(([cls, text]) =>
      el('li', {}, el('span', { class: `swatch ${cls}` }), text))), note, cells.table);

  function render(data) {
    note.replaceChildren(data.err ? unavailable(data.err) : '');
    if (data.err) return;
    const { cell_units: units, limits } = data;
    const cost = (level) => units / limits[level];
    setText(rule, `A cell carries ${limits.level_0} concurrent downloads of level-0 devices, ${limits.level_1} of level 1, ` +
      `${limits.level_2} of level 2 (${limits.cell_only} when the level is unknown). Mixed levels share it: each level-L ` +
      `download costs ${units}/limit(L) units of ${units} (level 0: ${cost('level_0')}, level 1: ${cost('level_1')}, ` +
      `level 2: ${cost('level_2')}, unknown: ${cost('cell_only')}). The line marks the peak.`);
    const levels = [['level_0', 'lvl0', 'level 0'], ['level_1', 'lvl1', 'level 1'], ['level_2', 'lvl2', 'level 2'], ['cell_only', 'lvlx', 'level unknown']];
    syncRows(cells.tbody, data.cells, (c) => c.cell_id ?? '(unknown)', (c) => {
      const id = c.cell_id ?? '(unknown)';
      return el('tr', { 'data-cell': id },
        el('td', {}, c.cell_id === null ? el('em', {}, '(unknown)') : el('code', {}, c.cell_id)),
        el('td', { class: 'used num' }, num(c.used_units)),
        el('td', { class: 'limit num' }, num(units)),
        el('td', {}, capacityBar({
          title: `Cell ${id} load`, capacity: units, peak: c.peak_units,
          segments: levels.map(([level, cls, label]) => ({ label, cls, units: (c.downloads[level] ?? 0) * cost(level) })),
        })),
        levels.map(([level]) => el('td', { class: 'num', title: `${c.downloads[level] ?? 0} × ${cost(level)} units` },
          num(c.downloads[level] ?? 0))),
        el('td', { class: 'num' }, num(c.waiting)),
        el('td', { class: 'num' }, num(c.peak_units)));
    }, { columns: cells.columns, empty: 'No downloads in progress and no device waiting for a slot.' });
  }
  return { node, render };
}

const loadCells = () => api.get('/ota/cells').catch((err) => ({ err }));

export function mountUpgrades(root, ctx) {
  const state = { products: [], packages: [], uploaded: [] };

  const packageForm = uploadForm();
  const taskForm = startForm();
  const tasks = table({ id: 'tasks', caption: 'Upgrade tasks, newest first', columns: ['Task', 'Status', 'Product', 'Version', 'Devices', 'Created'] });
  const tasksNote = el('div');
  const packages = table({ id: 'packages', caption: 'Packages, newest first',
    columns: ['Package', 'Product', 'Version', 'Type', 'Size', 'Chunks', 'From versions', 'Created', ''] });
  const packagesNote = el('div');
  const cells = cellsPanel();

  root.append(el('h1', {}, 'Upgrades'),
    el('div', { class: 'columns wide-left' },
      el('section', { class: 'panel' }, el('h2', {}, 'Tasks'), tasksNote, tasks.table),
      el('section', { class: 'panel' }, el('h2', {}, 'Start an upgrade'), taskForm.node)),
    el('div', { class: 'columns wide-left' },
      el('section', { class: 'panel' }, el('h2', {}, 'Packages'), packagesNote, packages.table),
      el('section', { class: 'panel' }, el('h2', {}, 'Upload a package'), packageForm.node)),
    cells.node);

  function uploadForm() {
    const product = el('select', { id: 'package-product', required: true });
    const version = el('input', { id: 'package-version', required: true, maxlength: 16, autocomplete: 'off' });
    const type = el('select', { id: 'package-type' }, el('option', { value: 'firmware' }, 'firmware'), el('option', { value: 'software' }, 'software'));
    const chunk = el('input', { id: 'package-chunk-size', type: 'number', min: 32, max: 500, placeholder: '500' });
    const sources = el('input', { id: 'package-sources', autocomplete: 'off', placeholder: 'any' });
    const file = el('input', { id: 'package-file', type: 'file', required: true });
    const error = formError('package-error');
    const done = el('p', { class: 'muted', role: 'status' });
    const node = el('form', { id: 'package-form', class: 'stack' },
      field('package-product', 'Product', product),
      el('div', { class: 'field-row' }, field('package-version', 'Version', version), field('package-type', 'Type', type),
        field('package-chunk-size', 'Chunk size (bytes)', chunk)),
      field('package-sources', 'Source versions, comma separated', sources, 'Versions a device may upgrade from; empty: any.'),
      field('package-file', 'Package file', file),
      error, el('button', { type: 'submit' }, 'Upload package'), done);
    node.addEventListener('submit', async (event) => {
      event.preventDefault();
      showFormError(error, null);
      const button = event.submitter;
      button.disabled = true;
      try {
        const created = await api.upload('/packages', {
          product_key: product.value, version: version.value.trim(), type: type.value,
          chunk_size: chunk.value, source_versions: sources.value.split(',').map((v) => v.trim()).filter(Boolean).join(','),
        }, file.files[0]);
        state.uploaded.push(created);
        setText(done, `Uploaded ${created.package_id}: ${created.size} bytes in ${created.chunk_count} chunks.`);
        version.value = '';
        file.value = '';
        renderPackageChoices();
        taskForm.choose(created.package_id);
        ctx.refreshNow();
      } catch (e) {
        showFormError(error, errorText(e));
      } finally {
        button.disabled = false;
      }
    });
    return { node, product };
  }

  function startForm() {
    const pkg = el('select', { id: 'task-package', required: true });
    const devices = el('textarea', { id: 'task-devices', rows: 6, required: true, spellcheck: 'false' });
    const count = el('input', { id: 'task-retry-count', type: 'number', min: 0, max: 5, placeholder: '0' });
    const interval = el('input', { id: 'task-retry-interval', type: 'number', min: 0, max: 1440, placeholder: '0' });
    const error = formError('task-error');
    const node = el('form', { id: 'task-form', class: 'stack' },
      field('task-package', 'Package', pkg),
      field('task-devices', 'Devices (one name per line)', devices),
      el('div', { class: 'field-row' }, field('task-retry-count', 'Retries', count), field('task-retry-interval', 'Retry interval (minutes)', interval)),
      error, el('button', { type: 'submit' }, 'Start upgrade'));
    node.addEventListener('submit', async (event) => {
      event.preventDefault();
      showFormError(error, null);
      const chosen = allPackages().find((p) => p.package_id === pkg.value);
      if (!chosen) return showFormError(error, 'Choose a package first (upload one below).');
      const names = devices.value.split('\n').map((n) => n.trim()).filter(Boolean);
      const body = { package_id: chosen.package_id, devices: names.map((device_name) => ({ product_key: chosen.product_key, device_name })) };
      if (count.value !== '' || interval.value !== '') {
        body.retry = { count: Number(count.value || 0), interval_minutes: Number(interval.value || 0) };
      }
      const button = event.submitter;
      button.disabled = true;
      try {
        const task = await api.post('/ota/tasks', body);
        location.hash = `#/upgrade/${encodeURIComponent(task.task_id)}`;
      } catch (e) {
        showFormError(error, errorText(e));
        button.disabled = false;
      }
    });
    const choose = (id) => {
      pkg.value = id;
      devices.focus();
    };
    return { node, pkg, choose };
  }

  // Packages uploaded here stay choosable even when the server cannot list packages.
  function allPackages() {
    const listed = new Set(state.packages.map((p) => p.package_id));
    return state.uploaded.filter((p) => !listed.has(p.package_id)).concat(state.packages);
  }

  function renderPackageChoices() {
    const all = allPackages();
    options(taskForm.pkg, all.length
      ? all.map((p) => [p.package_id, `${p.version} ${p.type} · ${p.product_key} · ${p.package_id}`])
      : [['', 'no package yet']]);
  }

  async function refresh() {
    const [products, pkgs, taskList, cellData] = await Promise.all([
      api.get('/products'),
      api.get('/packages').catch((err) => ({ err })),
      api.get('/ota/tasks').catch((err) => ({ err })),
      loadCells(),
    ]);
    options(packageForm.product, products.products.map((p) => [p.product_key, `${p.name} (${p.product_key})`]));
    packagesNote.replaceChildren(pkgs.err ? unavailable(pkgs.err) : '');
    state.packages = pkgs.packages ?? [];
    renderPackageChoices();
    syncRows(packages.tbody, allPackages(), (p) => p.package_id, (p) => el('tr', { 'data-package': p.package_id },
      el('td', {}, el('code', {}, p.package_id)),
      el('td', {}, el('code', {}, p.product_key)),
      el('td', {}, p.version),
      el('td', {}, p.type),
      el('td', { class: 'num' }, `${num(p.size)} B`),
      el('td', { class: 'num' }, `${num(p.chunk_count)} × ${p.chunk_size}`),
      el('td', {}, p.source_versions?.length ? p.source_versions.join(', ') : 'any'),
      el('td', {}, unixMsTime(p.created_at)),
      el('td', {}, el('button', { type: 'button', class: 'small', 'aria-label': `Upgrade devices to ${p.version} (${p.package_id})`,
        onclick: () => taskForm.choose(p.package_id) }, 'Use'))),
    { columns: packages.columns, empty: 'No packages.' });
    tasksNote.replaceChildren(taskList.err ? unavailable(taskList.err) : '');
    syncRows(tasks.tbody, taskList.tasks ?? [], (t) => t.task_id, (t) => el('tr', { 'data-task': t.task_id },
      el('td', {}, el('a', { href: `#/upgrade/${encodeURIComponent(t.task_id)}` }, t.task_id)),
      el('td', { class: 'status' }, statusBadge(t.status)),
      el('td', {}, el('code', {}, t.product_key)),
      el('td', {}, t.version),
      el('td', {}, countsSummary(t.counts)),
      el('td', {}, time(t.created_at))),
    { columns: tasks.columns, empty: taskList.err ? 'Task list unavailable.' : 'No upgrade tasks.' });
    cells.render(cellData);
  }

  return { refresh };
}

export function mountUpgradeTask(root, ctx, id) {
  const state = { task: null, filter: '', name: '' };
  const status = el('span', { id: 'task-status', class: 'badge' }, '…');
  const stop = el('button', { id: 'task-stop', type: 'button', class: 'danger', disabled: true, onclick: stopTask }, 'Stop task');
  const heading = el('h1', {}, `Upgrade task ${id}`);
  const facts = el('p', { class: 'muted' });
  const counts = el('ul', { id: 'task-counts', class: 'state-counts', 'aria-label': 'Devices by state' });
  const chartBox = el('figure', { class: 'chart-box' }, el('figcaption', {}, 'Devices finished over the task’s lifetime'));
  const barBox = el('figure', { class: 'chart-box' }, el('figcaption', {}, 'Devices by state now'));
  const cells = cellsPanel();
  const stateFilter = el('select', { id: 'task-state-filter' }, el('option', { value: '' }, 'all'), STATES.map(([s]) => el('option', { value: s }, s)));
  const nameFilter = el('input', { id: 'task-device-filter', type: 'search', autocomplete: 'off' });
  const shown = el('p', { class: 'muted', role: 'status' });
  const list = table({ id: 'task-device-list', caption: 'Devices in this task',
    columns: ['Device', 'State', 'Progress', 'Reason', 'Attempt', 'Retry at', 'Updated'] });

  stateFilter.addEventListener('change', () => { state.filter = stateFilter.value; renderDevices(); });
  nameFilter.addEventListener('input', () => { state.name = nameFilter.value.trim(); renderDevices(); });

  root.append(el('p', { class: 'crumbs' }, el('a', { href: '#/upgrades' }, 'Upgrades'), ' / task'),
    el('div', { class: 'title-row' }, heading, status, el('span', { class: 'spacer' }), stop),
    facts, counts,
    el('section', { class: 'panel' }, chartBox, barBox),
    el('section', { class: 'panel' }, el('h2', {}, 'Devices'),
      el('div', { class: 'toolbar' }, field('task-state-filter', 'State', stateFilter), field('task-device-filter', 'Device name contains', nameFilter)),
      shown, el('div', { class: 'scroll tall' }, list.table)),
    cells.node);

  async function stopTask() {
    if (!confirm(`Stop upgrade task ${id}? Devices not finished become canceled.`)) return;
    stop.disabled = true;
    try {
      render(await api.post(api.path`/ota/tasks/${id}/stop`));
    } catch (e) {
      ctx.showError(e);
      stop.disabled = false;
    }
  }

  async function refresh() {
    const [task, cellData] = await Promise.all([api.get(api.path`/ota/tasks/${id}`), loadCells()]);
    render(task);
    cells.render(cellData);
  }

  function render(task) {
    state.task = task;
    setText(heading, `Upgrade to ${task.version}`);
    setText(status, task.status);
    status.className = `badge s-${task.status}`;
    stop.disabled = task.status !== 'running';
    setText(facts, `Task ${task.task_id} · package ${task.package_id} · product ${task.product_key} · created ` +
      `${new Date(task.created_at).toLocaleString()}` + (task.stopped_at ? ` · stopped ${new Date(task.stopped_at).toLocaleString()}` : '') +
      (task.retry ? ` · retry ${task.retry.count} × every ${task.retry.interval_minutes} min` : ''));
    const present = STATES.filter(([s]) => task.counts?.[s]);
    const items = [...present.map(([s]) => [s, task.counts[s]]), ['total', task.devices.length]];
    syncRows(counts, items, ([s]) => s, ([s, n]) =>
      el('li', { 'data-state': s }, s === 'total' ? el('span', { class: 'badge' }, 'total') : stateBadge(s), el('span', { class: 'count' }, num(n))),
    { signature: JSON.stringify });
    renderChart(task);
    renderDevices();
  }

  function renderChart(task) {
    const from = Date.parse(task.created_at);
    const to = Math.max(Date.now(), from + 60_000);
    const cumulative = (which) => {
      const times = task.devices.filter((d) => d.state === which).map((d) => Date.parse(d.updated_at)).sort((a, b) => a - b);
      return [[from, 0], ...times.map((t, i) => [t, i + 1])];
    };
    const succeeded = cumulative('succeeded');
    const failed = cumulative('failed');
    const total = task.devices.length;
    const chart = timeChart({
      id: 'task-chart', title: 'Upgrade progress over time',
      label: `Upgrade progress since ${task.created_at}: ${succeeded.length - 1} succeeded and ${failed.length - 1} failed of ${total} devices`,
      from, to, yLabel: 'devices', width: chartWidth(chartBox),
      series: [
        { label: 'succeeded', cls: 'c-ok', step: true, points: succeeded },
        { label: 'failed', cls: 'c-bad', step: true, points: failed },
        { label: 'devices in task', cls: 'c-total', step: true, points: [[from, total]] },
      ],
    });
    const bar = stackedBar({
      id: 'task-states-bar', title: 'Devices by state', width: chartWidth(barBox),
      parts: STATES.map(([s, group]) => ({ label: s.replace(/_/g, ' '), value: task.counts?.[s] ?? 0, cls: `g-${group} st-${s}` })),
    });
    for (const [box, svg] of [[chartBox, chart], [barBox, bar]]) {
      const old = box.querySelector('svg');
      if (old) old.replaceWith(svg);
      else box.append(svg);
    }
    const legend = el('ul', { class: 'legend' }, STATES.filter(([s]) => task.counts?.[s]).map(([s, group]) =>
      el('li', {}, el('span', { class: `swatch g-${group} st-${s}` }), `${s.replace(/_/g, ' ')} ${task.counts[s]}`)));
    barBox.querySelector('ul')?.remove();
    barBox.append(legend);
  }

  function renderDevices() {
    const task = state.task;
    if (!task) return;
    const matching = task.devices.filter((d) => (!state.filter || d.state === state.filter) && (!state.name || d.device_name.includes(state.name)));
    const page = matching.slice(0, SHOWN_DEVICES);
    setText(shown, matching.length > page.length ? `Showing ${page.length} of ${num(matching.length)} matching devices.` : `${num(matching.length)} devices.`);
    syncRows(list.tbody, page, (d) => d.device_name, (d) => el('tr', { 'data-device': d.device_name, class: FINAL.has(d.state) ? 'final' : '' },
      el('td', {}, el('a', { href: `#/device/${encodeURIComponent(d.product_key ?? task.product_key)}/${encodeURIComponent(d.device_name)}` }, d.device_name)),
      el('td', { class: 'state' }, stateBadge(d.state)),
      el('td', { class: 'progress' }, el('progress', { max: 100, value: d.progress ?? 0, 'aria-label': `${d.device_name} download progress` }), ` ${d.progress ?? 0}%`),
      el('td', { class: 'reason' }, orDash(d.failure_reason)),
      el('td', { class: 'num' }, String(d.attempt ?? 0)),
      el('td', {}, time(d.retry_at)),
      el('td', {}, time(d.updated_at))),
    { columns: list.columns, empty: 'No device matches.' });
  }

  return { refresh };
}
