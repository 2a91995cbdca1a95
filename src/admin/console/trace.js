import * as api from './api.js';
import { el, field, formError, setText, showFormError, syncRows, table } from './dom.js';
import { bytesFromBase64, errorText, hex, orDash, payload, printable } from './format.js';

const KEPT_ENTRIES = 500;

// The device's message trace (every CoAP message to and from it while a trace runs).
export function mountTrace(base, ctx) {
  const state = { view: null, started: null, entries: [], selected: null, unavailable: null };

  const duration = el('input', { id: 'trace-duration', type: 'number', min: 1, max: 86400, step: 1, value: 600, required: true });
  const start = el('button', { id: 'trace-start', type: 'submit' }, 'Start trace');
  const stop = el('button', { id: 'trace-stop', type: 'button', class: 'quiet', disabled: true, onclick: stopTrace }, 'Stop trace');
  const status = el('p', { id: 'trace-status', role: 'status' }, 'not tracing');
  const error = formError('trace-error');
  const form = el('form', { class: 'toolbar' }, field('trace-duration', 'Trace for (s)', duration), start, stop);
  const entries = table({ id: 'trace', caption: 'Traced messages, latest first (select a row for its detail)',
    columns: ['Time', 'Dir', 'Port', 'Peer', 'Type', 'Code', 'MID', 'Token', 'Options', 'Payload', 'Outcome', 'ms'] });
  const detail = el('div', { id: 'trace-detail', class: 'trace-detail', 'aria-live': 'polite' });
  const node = el('section', { id: 'trace-panel', class: 'panel' },
    el('h2', {}, 'Trace'), form, error, status, el('div', { class: 'trace-layout' }, el('div', { class: 'scroll' }, entries.table), detail));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    showFormError(error, null);
    start.disabled = true;
    try {
      take(await api.put(`${base}/trace`, { duration_s: Number(duration.value) }));
    } catch (e) {
      showFormError(error, errorText(e));
    } finally {
      start.disabled = false;
    }
  });

  async function stopTrace() {
    showFormError(error, null);
    try {
      await api.del(`${base}/trace`);
      state.view = null;
    } catch (e) {
      if (e.code !== 'not_traced') showFormError(error, errorText(e));
      else state.view = null;
    }
    render();
  }

  function take(view) {
    // A new trace numbers its entries afresh.
    if (view.started_at !== state.started) {
      state.entries = [];
      state.started = view.started_at;
    }
    const known = new Set(state.entries.map((e) => e.seq));
    state.entries = state.entries.concat(view.entries.filter((e) => !known.has(e.seq))).slice(-KEPT_ENTRIES);
    state.view = view;
    state.unavailable = null;
    render();
  }

  async function refresh() {
    try {
      const after = state.view ? state.entries.at(-1)?.seq : undefined;
      take(await api.get(`${base}/trace`, { after }));
    } catch (e) {
      if (e.code === 'not_traced') state.view = null;
      else if (e.status === 404 || e.status === 405) state.unavailable = e;
      else throw e;
      render();
    }
  }

  function render() {
    const v = state.view;
    stop.disabled = !v;
    setText(start, v ? 'Restart trace' : 'Start trace');
    if (state.unavailable) setText(status, `Tracing unavailable: ${errorText(state.unavailable)}`);
    else if (v) {
      setText(status, `tracing until ${new Date(v.until).toLocaleString()} · ${state.entries.length} shown` +
        (v.dropped ? ` · ${v.dropped} oldest dropped (more than ${v.max_entries})` : ''));
    } else setText(status, 'not tracing');
    syncRows(entries.tbody, state.entries.slice().reverse(), (e) => e.seq, row,
      { columns: entries.columns, empty: 'No traced messages.', signature: (e) => `${e.seq}|${e.seq === state.selected}` });
  }

  function row(e) {
    const select = () => {
      state.selected = e.seq;
      detail.replaceChildren(...entryDetail(e).filter(Boolean));
      render();
    };
    return el('tr', {
      class: `trace-entry dir-${e.direction}${e.seq === state.selected ? ' selected' : ''}${e.outcome ? ' refused' : ''}`,
      'data-seq': e.seq, tabindex: 0, 'aria-selected': String(e.seq === state.selected),
      onclick: select, onkeydown: (k) => { if (k.key === 'Enter' || k.key === ' ') { k.preventDefault(); select(); } },
    },
    el('td', { title: e.time }, clockMs(e.time)),
    el('td', { class: 'dir' }, e.direction === 'in' ? '→ in' : '← out'),
    el('td', {}, e.port),
    el('td', {}, el('code', {}, e.peer), e.authenticated ? el('span', { class: 'tag', title: 'the DTLS PSK identity named this device' }, 'PSK') : null),
    el('td', {}, e.type),
    el('td', { title: e.code }, e.code_name || e.code),
    el('td', { class: 'num' }, String(e.message_id)),
    el('td', {}, el('code', {}, e.token_hex || '—')),
    el('td', { class: 'options' }, summary(e.options)),
    el('td', { class: 'payload' }, payload(e.payload_base64), el('span', { class: 'hint' }, ` ${e.payload_size} B${e.payload_truncated ? ' (cut)' : ''}`)),
    el('td', { class: e.outcome ? 'warn' : '' }, e.outcome ?? (e.answers !== null && e.answers !== undefined ? `answers #${e.answers}` : '')),
    el('td', { class: 'num' }, e.elapsed_ms === null || e.elapsed_ms === undefined ? '' : e.elapsed_ms.toFixed(1)));
  }

  return { node, refresh };
}

function clockMs(iso) {
  const d = new Date(iso);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

function codeText(e) {
  return `${e.code} ${e.code_name ?? ''}`.trim();
}

function summary(options) {
  const text = options.map((o) => (o.value ? `${o.name}=${o.value}` : o.name)).join(' ');
  return text.length > 60 ? `${text.slice(0, 59)}…` : text;
}

function entryDetail(e) {
  const bytes = bytesFromBase64(e.payload_base64);
  const text = printable(bytes);
  return [
    el('h3', {}, `#${e.seq} ${e.direction === 'in' ? 'from' : 'to'} ${e.peer} on ${e.port}`),
    el('p', {}, `${e.type} ${codeText(e)} · MID ${e.message_id} · token ${e.token_hex || '(none)'} · ${e.time}`),
    e.outcome ? el('p', { class: 'warn' }, `Outcome: ${e.outcome}`) : null,
    e.answers !== null && e.answers !== undefined ? el('p', {}, `Answers entry #${e.answers}`) : null,
    e.elapsed_ms !== null && e.elapsed_ms !== undefined ? el('p', {}, `Elapsed ${e.elapsed_ms} ms`) : null,
    el('table', { class: 'grid compact', 'aria-label': 'Options' },
      el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'No.'), el('th', { scope: 'col' }, 'Option'), el('th', { scope: 'col' }, 'Value'))),
      el('tbody', {}, e.options.length ? e.options.map((o) => el('tr', {},
        el('td', { class: 'num' }, String(o.number)), el('td', {}, o.name), el('td', {}, el('code', {}, orDash(o.value)))))
        : el('tr', {}, el('td', { colspan: 3 }, 'No options.')))),
    el('h4', {}, `Payload, ${e.payload_size} bytes${e.payload_truncated ? ` (first ${bytes.length} kept)` : ''}`),
    el('pre', { class: 'hex' }, hex(bytes).replace(/(.{2})/g, '$1 ').replace(/((?:\S\S ){16})/g, '$1\n').trim() || '(empty)'),
    el('pre', { class: 'json' }, text ?? '(not text)'),
  ];
}
