import * as api from './api.js';
import { el, field, setText, statusBadge, syncRows, table } from './dom.js';
import { num, orDash, time } from './format.js';
import { chartWidth, timeChart } from './chart.js';

const STATUSES = ['inactive', 'online', 'abnormal', 'offline'];
const PAGE_SIZE = 100;
const CHART_MINUTES = 180;

export function mountFleet(root, ctx, selectedKey) {
  const state = { selected: selectedKey, name: '', status: '', cursors: [], next: null };

  const products = table({ id: 'products', caption: 'Products', hideCaption: true, columns: ['Name', 'Key', 'Devices', 'Online'] });
  const heading = el('h1', {}, 'Fleet');
  const counts = el('div', { id: 'counts', class: 'counts', role: 'group', 'aria-label': 'Devices by status' },
    STATUSES.map((s) => el('button', {
      type: 'button', class: `count-tile s-${s}`, 'data-status': s, 'aria-pressed': 'false',
      title: `Show only ${s} devices`, onclick: () => setStatus(state.status === s ? '' : s),
    }, el('span', { class: 'count' }, '—'), el('span', { class: 'label' }, s))));
  const total = el('p', { class: 'muted' });
  const chartBox = el('figure', { class: 'chart-box' }, el('figcaption', {}, 'Uplinks per minute, last 3 hours'));
  const chartNote = el('p', { class: 'panel-error', hidden: true });

  const search = el('input', { id: 'device-search', type: 'search', autocomplete: 'off', placeholder: 'part of a device name' });
  const statusFilter = el('select', { id: 'status-filter' },
    el('option', { value: '' }, 'all'), STATUSES.map((s) => el('option', { value: s }, s)));
  const form = el('form', { class: 'toolbar', role: 'search', 'aria-label': 'Device search' },
    field('device-search', 'Search devices', search),
    field('status-filter', 'Status', statusFilter),
    el('button', { type: 'submit' }, 'Search'));
  const devices = table({ id: 'devices', caption: 'Devices', columns: ['Name', 'Status', 'Last seen', 'Address', 'Version', 'Cell', 'RSRP'] });
  const first = el('button', { type: 'button', class: 'quiet', hidden: true, onclick: () => page([]) }, 'First page');
  const nextButton = el('button', { type: 'button', hidden: true, onclick: () => page([...state.cursors, state.next]) }, 'Next page');
  const pager = el('div', { class: 'pager' }, first, nextButton);

  root.append(el('div', { class: 'fleet' },
    el('aside', { class: 'panel' }, el('h2', {}, 'Products'), products.table),
    el('section', { class: 'product' }, heading, total, counts, chartBox, chartNote, form, devices.table, pager)));

  function page(cursors) {
    state.cursors = cursors;
    ctx.refreshNow();
  }
  function setStatus(status) {
    state.status = status;
    statusFilter.value = status;
    page([]);
  }

  let debounce = 0;
  search.addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { state.name = search.value.trim(); page([]); }, 300);
  });
  statusFilter.addEventListener('change', () => setStatus(statusFilter.value));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    clearTimeout(debounce);
    state.name = search.value.trim();
    setStatus(statusFilter.value);
  });

  async function refresh() {
    const list = (await api.get('/products')).products;
    const pk = state.selected ?? list[0]?.product_key;
    const product = list.find((p) => p.product_key === pk);
    // The selected product's activity feeds the chart; the others only need their counts.
    const activity = await Promise.all(list.map((p) =>
      api.get(api.path`/products/${p.product_key}/activity`, { minutes: p.product_key === pk ? CHART_MINUTES : 1 })
        .catch((err) => ({ err }))));
    const byKey = new Map(list.map((p, i) => [p.product_key, activity[i]]));
    renderProducts(list, byKey, pk);
    if (!pk) {
      setText(heading, 'Fleet');
      setText(total, 'No products yet: create one with `nbhub product create` or POST /api/v1/products.');
      return;
    }
    if (!product) throw new api.ApiError(404, 'not_found', `product ${pk} not found`);
    setText(heading, `${product.name}`);
    const current = byKey.get(pk);
    // Without activity (an older server) the page still lists devices, with the API's reason shown.
    renderActivity(current);
    const cursor = state.cursors.at(-1);
    const result = await api.get(api.path`/products/${pk}/devices`, {
      limit: PAGE_SIZE, after: cursor, status: state.status, name: state.name,
    });
    renderDevices(pk, result);
  }

  function renderProducts(list, byKey, pk) {
    syncRows(products.tbody, list, (p) => p.product_key, (p) => {
      const a = byKey.get(p.product_key);
      const select = () => { location.hash = `#/fleet/${encodeURIComponent(p.product_key)}`; };
      return el('tr', { 'data-product': p.product_key, class: p.product_key === pk ? 'selected' : '', onclick: select },
        el('td', {}, el('a', { href: `#/fleet/${encodeURIComponent(p.product_key)}`, 'aria-current': p.product_key === pk ? 'true' : null }, p.name)),
        el('td', {}, el('code', {}, p.product_key)),
        el('td', { class: 'num' }, a.err ? '—' : num(a.total)),
        el('td', { class: 'num' }, a.err ? '—' : num(a.counts?.online)));
    }, {
      columns: products.columns, empty: 'No products.',
      signature: (p) => JSON.stringify([p, byKey.get(p.product_key)?.total, byKey.get(p.product_key)?.counts, p.product_key === pk]),
    });
  }

  function renderActivity(activity) {
    chartNote.hidden = !activity.err;
    if (activity.err) {
      setText(chartNote, `Activity unavailable: ${activity.err.message} (${activity.err.code})`);
      for (const tile of counts.children) setText(tile.querySelector('.count'), '—');
      setText(total, '');
      chartBox.querySelector('svg')?.remove();
      return;
    }
    for (const tile of counts.children) {
      const s = tile.dataset.status;
      setText(tile.querySelector('.count'), num(activity.counts[s] ?? 0));
      tile.setAttribute('aria-pressed', String(state.status === s));
    }
    const perMinute = activity.uplinks_per_minute.map((m) => [Date.parse(m.minute), m.count]);
    const sum = perMinute.reduce((n, [, c]) => n + c, 0);
    setText(total, `${num(activity.total)} devices · ${num(sum)} uplinks in the last 3 hours`);
    const from = perMinute[0]?.[0] ?? Date.now() - CHART_MINUTES * 60_000;
    const svg = timeChart({
      id: 'uplinks-chart',
      title: 'Uplinks per minute, last 3 hours',
      label: `Uplinks per minute over the last 3 hours: ${sum} in total, ${perMinute.at(-1)?.[1] ?? 0} in the current minute`,
      from, to: Date.now(), yLabel: 'uplinks / min', width: chartWidth(chartBox),
      series: [{ label: 'uplinks', cls: 'c-uplinks', area: true, points: perMinute }],
      pointTitle: (t, v) => `${new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false })}: ${v} uplinks`,
    });
    const old = chartBox.querySelector('svg');
    if (old) old.replaceWith(svg);
    else chartBox.append(svg);
  }

  function renderDevices(pk, result) {
    state.next = result.next;
    const filtered = state.name || state.status;
    syncRows(devices.tbody, result.devices, (d) => d.device_name, (d) =>
      el('tr', { 'data-device': d.device_name },
        el('td', {},
          el('a', { class: 'device-link', href: `#/device/${encodeURIComponent(pk)}/${encodeURIComponent(d.device_name)}` }, d.device_name),
          d.enabled ? null : el('span', { class: 'tag' }, 'disabled'),
          d.home?.state && d.home.state !== 'here' ? el('span', { class: 'tag' }, `${d.home.state} ${d.home.instance ?? ''}`.trim()) : null),
        el('td', { class: 'status' }, statusBadge(d.status)),
        el('td', {}, time(d.last_seen)),
        el('td', {}, el('code', {}, orDash(d.address))),
        el('td', {}, orDash(d.version)),
        el('td', {}, orDash(d.radio?.cell_id)),
        el('td', { class: 'num' }, d.radio?.rsrp === null || d.radio?.rsrp === undefined ? '—' : `${d.radio.rsrp} dBm`)),
    { columns: devices.columns, empty: filtered ? 'No device matches on this page.' : 'No devices.' });
    nextButton.hidden = !result.next;
    first.hidden = state.cursors.length === 0;
  }

  return { refresh };
}
