import * as api from './api.js';
import { detailList, el, field, formError, setText, showFormError, syncRows, table } from './dom.js';
import { base64FromBytes, bytesFromBase64, bytesFromHex, errorText, json, num, orDash, payload, time } from './format.js';
import { mountTrace } from './trace.js';

const KEPT_MESSAGES = 200;
// Messages come oldest first; a long history is caught up over a few refreshes, not at once.
const PAGES_PER_REFRESH = 10;

export function mountDevice(root, ctx, pk, dn) {
  const base = api.path`/products/${pk}/devices/${dn}`;
  const state = { device: null, messages: [], cursor: undefined, commands: [] };

  const status = el('span', { id: 'device-status', class: 'badge' }, '…');
  const enabled = el('span', { id: 'device-enabled', class: 'tag' }, '…');
  const toggle = el('button', { id: 'toggle-enabled', type: 'button', disabled: true, onclick: toggleEnabled }, 'Disable');
  const details = el('div', { class: 'panel' }, el('h2', {}, 'State'), el('div', { class: 'details-box' }));
  const shadow = el('pre', { id: 'shadow', class: 'json' }, '…');

  const messages = table({ id: 'messages', caption: 'Messages, latest first', columns: ['Received', 'Topic', 'Size', 'Payload', 'Decoded'] });
  const commands = table({ id: 'commands', caption: 'Commands, latest first',
    columns: ['Command', 'Status', 'Payload', 'Created', 'Sent', 'Delivered', 'Finished', 'Reason', 'Result', ''] });

  const form = commandForm();
  const trace = mountTrace(base, ctx);

  root.append(
    el('p', { class: 'crumbs' }, el('a', { href: `#/fleet/${encodeURIComponent(pk)}` }, pk), ' / device'),
    el('div', { class: 'title-row' }, el('h1', {}, dn), status, enabled, el('span', { class: 'spacer' }), toggle),
    el('div', { class: 'columns' }, details, el('section', { class: 'panel' }, el('h2', {}, 'Shadow'), shadow)),
    el('section', { class: 'panel' }, el('h2', {}, 'Commands'), form.node, commands.table),
    el('section', { class: 'panel' }, el('h2', {}, 'Messages'), el('div', { class: 'scroll' }, messages.table)),
    trace.node);

  async function toggleEnabled() {
    toggle.disabled = true;
    try {
      renderDevice(await api.patch(base, { enabled: !state.device.enabled }));
    } catch (e) {
      ctx.showError(e);
    } finally {
      toggle.disabled = false;
    }
  }

  function commandForm() {
    const payloadInput = el('textarea', { id: 'command-payload', rows: 3, spellcheck: 'false', required: true });
    const encoding = el('select', { id: 'command-encoding' },
      ['text', 'hex', 'base64'].map((v) => el('option', { value: v }, v)),
      el('option', { value: 'json' }, 'json (codec encodes)'));
    const strategy = el('select', { id: 'command-strategy' },
      el('option', { value: 'delay' }, 'delay (when it next shows life)'),
      el('option', { value: 'immediately' }, 'immediately (now or fail)'));
    const expire = el('input', { id: 'command-expire', type: 'number', min: 1, max: 2592000, step: 1, placeholder: 'server default' });
    const error = formError('command-error');
    const sent = el('p', { class: 'muted', role: 'status' });
    const node = el('form', { id: 'command-form', class: 'command-form' },
      field('command-payload', 'Payload', payloadInput),
      el('div', { class: 'field-row' },
        field('command-encoding', 'Encoding', encoding),
        field('command-strategy', 'Send', strategy),
        field('command-expire', 'Expires after (s)', expire),
        el('button', { type: 'submit' }, 'Send command')),
      error, sent);
    node.addEventListener('submit', async (event) => {
      event.preventDefault();
      showFormError(error, null);
      let body;
      try {
        body = commandBody(payloadInput.value, encoding.value);
      } catch (e) {
        return showFormError(error, e.message);
      }
      body.send_strategy = strategy.value;
      if (expire.value) body.expire_time = Number(expire.value);
      const button = event.submitter;
      button.disabled = true;
      try {
        const command = await api.post(`${base}/commands`, body);
        state.commands.push(command);
        renderCommands();
        payloadInput.value = '';
        setText(sent, `Command ${command.command_id} queued (${command.status}).`);
        ctx.refreshNow();
      } catch (e) {
        showFormError(error, errorText(e));
      } finally {
        button.disabled = false;
      }
    });
    return { node };
  }

  async function refresh() {
    const [device, commandList, shadowDoc] = await Promise.all([
      api.get(base),
      api.get(`${base}/commands`),
      api.get(`${base}/shadow`).catch((e) => (e.status === 404 ? null : { err: e })),
    ]);
    renderDevice(device);
    state.commands = commandList.commands;
    renderCommands();
    renderShadow(shadowDoc);
    await loadMessages();
    await trace.refresh();
  }

  async function loadMessages() {
    for (let i = 0; i < PAGES_PER_REFRESH; i++) {
      const page = await api.get(`${base}/messages`, { after: state.cursor, limit: 1000 });
      if (page.messages.length) {
        state.messages = state.messages.concat(page.messages).slice(-KEPT_MESSAGES);
        state.cursor = page.messages.at(-1).id;
      }
      if (!page.next) break;
    }
    syncRows(messages.tbody, state.messages.slice().reverse(), (m) => m.id, (m) =>
      el('tr', { class: 'message', 'data-message': m.id },
        el('td', {}, time(m.received_at)),
        el('td', {}, el('code', {}, m.topic)),
        el('td', { class: 'num' }, num(bytesFromBase64(m.payload_base64).length)),
        el('td', { class: 'payload' }, payload(m.payload_base64)),
        el('td', { class: 'decoded' }, 'decoded' in m ? json(m.decoded)
          : m.decode_error ? el('span', { class: 'warn' }, `${m.decode_error.kind}: ${m.decode_error.message}`) : '')),
    { columns: messages.columns, empty: 'No messages stored.' });
  }

  function renderDevice(d) {
    state.device = d;
    setText(status, d.status);
    status.className = `badge s-${d.status}`;
    setText(enabled, d.enabled ? 'enabled' : 'disabled');
    enabled.className = d.enabled ? 'tag' : 'tag tag-warn';
    setText(toggle, d.enabled ? 'Disable' : 'Enable');
    toggle.disabled = false;
    const r = d.radio ?? {};
    const pairs = [
      ['Address', el('code', {}, orDash(d.address)), 'device-address'],
      ['Last seen', time(d.last_seen), 'device-last-seen'],
      ['Version', orDash(d.version), 'device-version'],
      ['RSRP', r.rsrp === null || r.rsrp === undefined ? '—' : `${r.rsrp} dBm`, 'device-rsrp'],
      ['SINR', r.sinr === null || r.sinr === undefined ? '—' : `${r.sinr} dB`, 'device-sinr'],
      ['Cell', orDash(r.cell_id), 'device-cell'],
      ['Node id', el('code', {}, orDash(d.node_id)), 'device-node-id'],
      ['Home', d.home?.instance ? `${d.home.state} → ${d.home.instance}` : orDash(d.home?.state), 'device-home'],
    ];
    if (d.registration) {
      const g = d.registration;
      pairs.push(['LwM2M', `${g.lwm2m_version}, lifetime ${g.lifetime_s} s, ${g.queue_mode ? 'queue mode (UQ)' : 'always listening (U)'}`, 'device-registration'],
        ['Objects', g.objects.join(' '), 'device-objects'],
        ['Registered', time(g.updated_at)]);
    }
    if (d.observe) pairs.push(['Observe token', el('code', {}, d.observe.token_hex), 'device-observe']);
    const box = details.querySelector('.details-box');
    // Rebuilt only when a value changed, so text selected in the panel stays selected.
    const signature = JSON.stringify(d);
    if (box.dataset.sig !== signature) {
      box.replaceChildren(detailList(pairs));
      box.dataset.sig = signature;
    }
  }

  function renderCommands() {
    syncRows(commands.tbody, state.commands.slice().reverse(), (c) => c.command_id, (c) =>
      el('tr', { 'data-command': c.command_id },
        el('td', {}, el('code', {}, c.command_id)),
        el('td', { class: 'status' }, el('span', { class: `badge c-${c.status.toLowerCase()}` }, c.status)),
        el('td', { class: 'payload' }, c.payload_json ? json(c.payload_json) : c.payload_base64 !== undefined ? payload(c.payload_base64) : '—',
          c.send_strategy === 'immediately' ? el('span', { class: 'tag' }, 'immediately') : null),
        el('td', { title: c.expires_at ? `expires ${c.expires_at}` : null }, time(c.created_at)),
        el('td', {}, time(c.sent_at)),
        el('td', {}, time(c.delivered_at)),
        el('td', {}, time(c.finished_at)),
        el('td', { class: 'reason' }, orDash(c.reason)),
        el('td', { class: 'payload' }, c.result_json ? json(c.result_json) : c.result_base64 ? payload(c.result_base64) : '—'),
        el('td', {}, c.status === 'PENDING'
          ? el('button', { type: 'button', class: 'small', 'aria-label': `Cancel command ${c.command_id}`, onclick: () => cancel(c) }, 'Cancel')
          : null)),
    { columns: commands.columns, empty: 'No commands.' });
  }

  async function cancel(command) {
    try {
      await api.del(api.path`/commands/${command.command_id}`);
      ctx.refreshNow();
    } catch (e) {
      ctx.showError(e);
    }
  }

  function renderShadow(doc) {
    if (doc?.err) return setText(shadow, `Shadow unavailable: ${errorText(doc.err)}`);
    const empty = !doc || (doc.version === 0 && !doc.state?.desired && !doc.state?.reported);
    setText(shadow, empty ? 'no shadow' : JSON.stringify({
      desired: doc.state?.desired ?? null, reported: doc.state?.reported ?? null, version: doc.version,
      timestamp: doc.timestamp ? new Date(doc.timestamp).toISOString() : null,
    }, null, 2));
  }

  return { refresh };
}

function commandBody(text, encoding) {
  if (encoding === 'json') {
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new Error(`payload is not JSON: ${e.message}`);
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error('a json payload must be an object');
    return { payload_json: value };
  }
  if (encoding === 'hex') return { payload_base64: base64FromBytes(bytesFromHex(text)) };
  if (encoding === 'base64') {
    const clean = text.replace(/\s/g, '');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(clean) || clean.length % 4 !== 0) throw new Error('payload is not valid base64');
    return { payload_base64: clean };
  }
  return { payload_base64: base64FromBytes(new TextEncoder().encode(text)) };
}
