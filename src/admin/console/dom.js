// Element building without innerHTML: every server-provided string goes through text nodes or
// attribute values, so nothing the devices or the API send can become markup.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

// Replaces the content only when it differs, so a live refresh does not re-announce unchanged
// text to screen readers or disturb a selection.
export function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

export function statusBadge(status, extraClass = '') {
  return el('span', { class: `badge s-${status} ${extraClass}`.trim() }, status);
}

export function table({ id, caption, columns, className = '', hideCaption = false }) {
  const tbody = el('tbody');
  const node = el('table', { id, class: `grid ${className}`.trim() },
    el('caption', { class: hideCaption ? 'sr-only' : null }, caption),
    el('thead', {}, el('tr', {}, columns.map((c) => el('th', { scope: 'col' }, c)))),
    tbody);
  return { table: node, tbody, columns: columns.length };
}

const rowState = new WeakMap();

// Keyed update of table rows: a row whose data did not change is kept as it is, so keyboard
// focus, the open row and text selection survive the 2-second refresh. Relative times are
// refreshed separately (refreshTimes) so they do not count as a change.
export function syncRows(parent, items, keyOf, render, { empty = 'Nothing here.', columns = 1, signature = JSON.stringify } = {}) {
  const rows = parent.children;
  if (items.length === 0) {
    if (rows.length !== 1 || !rows[0].classList.contains('empty') || rows[0].textContent !== empty) {
      parent.replaceChildren(el('tr', { class: 'empty' }, el('td', { colspan: columns }, empty)));
    }
    return;
  }
  const existing = new Map();
  for (const row of rows) {
    const state = rowState.get(row);
    if (state) existing.set(state.key, { row, sig: state.sig });
  }
  items.forEach((item, i) => {
    const key = keyOf(item);
    const sig = signature(item);
    const old = existing.get(key);
    let row = old?.row;
    if (!old || old.sig !== sig) {
      row = render(item);
      rowState.set(row, { key, sig });
      if (old) old.row.replaceWith(row);
    }
    existing.delete(key);
    if (rows[i] !== row) parent.insertBefore(row, rows[i] ?? null);
  });
  while (rows.length > items.length) rows[items.length].remove();
}

export function formError(id) {
  return el('div', { id, class: 'form-error', role: 'alert', hidden: true });
}

export function showFormError(node, message) {
  node.hidden = !message;
  setText(node, message ?? '');
}

export function field(id, label, control, hint) {
  return el('div', { class: 'field' },
    el('label', { for: id }, label),
    control,
    hint ? el('span', { class: 'hint', id: `${id}-hint` }, hint) : null);
}

export function options(select, items) {
  // Rebuilt only when the choices change, so an open drop-down or a choice the user made is kept.
  const signature = JSON.stringify(items);
  if (select.dataset.options === signature) return;
  const chosen = select.value;
  select.replaceChildren(...items.map(([value, label]) => el('option', { value }, label)));
  if (items.some(([value]) => value === chosen)) select.value = chosen;
  select.dataset.options = signature;
}

export function detailList(pairs) {
  return el('dl', { class: 'details' }, pairs.map(([term, value, id]) =>
    [el('dt', {}, term), el('dd', { id }, value)]));
}
