// The only module that talks to the server. Every failure becomes an ApiError carrying the
// server's own code and message, so the pages can show exactly what the API said.

const BASE = '/api/v1';
const TOKEN_KEY = 'nbhub.token';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// sessionStorage: the token lives as long as the tab, never on disk.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

let unauthorized = () => {};
export function onUnauthorized(handler) {
  unauthorized = handler;
}

// Tagged template that percent-encodes every interpolated segment (device names may hold ':' or '@').
export function path(strings, ...values) {
  return strings.reduce((out, s, i) => out + s + (i < values.length ? encodeURIComponent(values[i]) : ''), '');
}

async function request(method, route, { query, json, body, contentType, bearer = token.get() } = {}) {
  const url = new URL(BASE + route, location.origin);
  for (const [key, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, value);
  }
  const headers = { Accept: 'application/json' };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (contentType) {
    headers['Content-Type'] = contentType;
  }
  let res;
  try {
    res = await fetch(url, { method, headers, body, cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, 'network', `cannot reach the server: ${e.message}`);
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = data?.error;
    const err = new ApiError(res.status, e?.code ?? `http_${res.status}`, e?.message ?? (res.statusText || `HTTP ${res.status}`));
    if (res.status === 401 && bearer === token.get()) unauthorized(err);
    throw err;
  }
  return data;
}

export const get = (route, query) => request('GET', route, { query });
export const post = (route, json) => request('POST', route, { json });
export const put = (route, json) => request('PUT', route, { json });
export const patch = (route, json) => request('PATCH', route, { json });
export const del = (route) => request('DELETE', route);
export const upload = (route, query, blob) =>
  request('POST', route, { query, body: blob, contentType: 'application/octet-stream' });

// Checks a candidate token before keeping it: a wrong one must not replace a stored one.
export async function signIn(candidate) {
  await request('GET', '/products', { bearer: candidate });
  token.set(candidate);
}
