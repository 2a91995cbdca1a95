import { el } from './dom.js';

export function errorText(err) {
  return err?.code ? `${err.message} (${err.code})` : String(err?.message ?? err);
}

function ago(iso, now = Date.now()) {
  const seconds = Math.round((now - Date.parse(iso)) / 1000);
  const abs = Math.abs(seconds);
  const [value, unit] =
    abs < 60 ? [abs, 's'] : abs < 3600 ? [Math.floor(abs / 60), 'min'] :
    abs < 86400 ? [Math.floor(abs / 3600), 'h'] : [Math.floor(abs / 86400), 'd'];
  return seconds >= 0 ? `${value} ${unit} ago` : `in ${value} ${unit}`;
}

// A relative time with the exact one on hover; refreshTimes keeps the relative text current.
export function time(iso) {
  if (!iso) return el('span', { class: 'none' }, '—');
  return el('time', { datetime: iso, title: new Date(iso).toString() + `\n${iso}` }, ago(iso));
}

export function unixMsTime(ms) {
  return ms ? time(new Date(ms).toISOString()) : time(null);
}

export function refreshTimes(root) {
  const now = Date.now();
  for (const t of root.querySelectorAll('time[datetime]')) {
    const text = ago(t.getAttribute('datetime'), now);
    if (t.textContent !== text) t.textContent = text;
  }
}

export function clock(date = new Date()) {
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

export function num(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString();
}

export function orDash(value) {
  return value === null || value === undefined || value === '' ? '—' : String(value);
}

export function bytesFromBase64(b64) {
  const bin = atob(b64 ?? '');
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

export function base64FromBytes(bytes) {
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function bytesFromHex(text) {
  const clean = text.replace(/[\s:]/g, '');
  if (!/^([0-9a-fA-F]{2})*$/.test(clean)) throw new Error('hex payload must be pairs of hex digits');
  return Uint8Array.from(clean.match(/../g) ?? [], (h) => parseInt(h, 16));
}

// Text only when the bytes are valid UTF-8 without control characters other than whitespace:
// binary payloads (PCP, LwM2M TLV) would otherwise show as mojibake.
export function printable(bytes) {
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    return /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/.test(text) ? null : text;
  } catch {
    return null;
  }
}

export function payload(b64) {
  const bytes = bytesFromBase64(b64);
  if (bytes.length === 0) return el('span', { class: 'none' }, '(empty)');
  const text = printable(bytes);
  return text === null
    ? el('code', { class: 'hex', title: `${bytes.length} bytes, hex` }, hex(bytes))
    : el('span', { class: 'text-payload', title: `${bytes.length} bytes, text` }, text);
}

export function json(value) {
  return el('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}
