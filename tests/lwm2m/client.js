#!/usr/bin/env node
// LwM2M test client built on lwm2m-node-lib 1.4.0 (coap 0.22.0).
//
//   node client.js --host 127.0.0.1 --port 5683 --ep imei-123 --lt 300 --binding U \
//                  [--mode patched|native] [--script 'step;step;...'] [--timeout 60000]
//                  [--fw-block 256] [--fw-version 1.0.0] [--lwm2m 1.0] [--single-socket]
// Every flag also reads an env var: LWC_HOST LWC_PORT LWC_EP LWC_LT LWC_BINDING LWC_MODE
//   LWC_SCRIPT LWC_TIMEOUT LWC_FW_BLOCK LWC_FW_VERSION LWC_LWM2M LWC_SINGLE_SOCKET=1
//
// stdout: one JSON object per line, always with "ev" (registered, read, observe, observe-end,
//   notify, write, execute, fw-state, fw-downloaded, fw-error, updated, deregistered, error,
//   timeout, exit). The library's own logs go to stderr.
// stdin / --script: the same steps, one per line (stdin) or ';'-separated (--script):
//   wait:MS | waitev:NAME[:MS] | notify:/19/0/0=HEX | set:/3/0/3=TEXT | update | deregister | exit
//
// --mode native : library as shipped (text-only values, utf8-decoded writes, no Content-Format)
// --mode patched (default): the library still does Register/Update/Deregister, the CoAP listener,
//   routing, Discover and Execute; Read/Observe/Write are replaced by binary-safe handlers that set
//   Content-Format, speak TLV (11542) for instance reads/writes, and the LwM2M 1.x content formats
//   are registered so requests carrying them are not silently dropped.
'use strict';
const crypto = require('crypto');
const coap = require('coap');
const logger = require('logops');
logger.setStream(process.stderr);

// ---------- args ----------
const argv = process.argv.slice(2);
function arg(name, env, dflt) {
  const i = argv.indexOf('--' + name);
  if (i >= 0) return (argv[i + 1] === undefined || argv[i + 1].startsWith('--')) ? 'true' : argv[i + 1];
  return process.env[env] !== undefined ? process.env[env] : dflt;
}
const HOST = arg('host', 'LWC_HOST', '127.0.0.1');
const PORT = parseInt(arg('port', 'LWC_PORT', '5683'), 10);
const EP = arg('ep', 'LWC_EP', 'client-' + process.pid);
const LT = arg('lt', 'LWC_LT', '300');
const BINDING = arg('binding', 'LWC_BINDING', 'U');
const MODE = arg('mode', 'LWC_MODE', 'patched');
const SCRIPT = arg('script', 'LWC_SCRIPT', '');
const TIMEOUT = parseInt(arg('timeout', 'LWC_TIMEOUT', '60000'), 10);
const FW_BLOCK = parseInt(arg('fw-block', 'LWC_FW_BLOCK', '0'), 10); // 0 = let the server choose
const FW_VERSION = arg('fw-version', 'LWC_FW_VERSION', '1.0.0');
const LWM2M_VER = arg('lwm2m', 'LWC_LWM2M', '1.0');
const SINGLE_SOCKET = /^(1|true)$/.test(arg('single-socket', 'LWC_SINGLE_SOCKET', '0'));
const ACK_TIMEOUT = parseFloat(arg('ack-timeout', 'LWC_ACK_TIMEOUT', '2')); // CoAP ACK_TIMEOUT, seconds
if (ACK_TIMEOUT !== 2) coap.updateTiming({ ackTimeout: ACK_TIMEOUT });
const PATCHED = MODE !== 'native';

const t0 = Date.now();
const evCount = {};
const evWaiters = [];
function emit(ev, obj) {
  process.stdout.write(JSON.stringify(Object.assign({ ev, t: Date.now() - t0 }, obj || {})) + '\n');
  evCount[ev] = (evCount[ev] || 0) + 1;
  for (const w of evWaiters.slice()) w();
}
const hardTimer = setTimeout(() => { emit('timeout', { ms: TIMEOUT }); process.exit(2); }, TIMEOUT);

// ---------- content formats ----------
// Must be registered before the library starts its listener: coap 0.22 throws on an unknown
// Content-Format/Accept number while parsing, and its server then drops the request unanswered.
const CF = { 'text/plain': 0, 'application/link-format': 40, 'application/octet-stream': 42,
  'application/json': 50, 'application/cbor': 60 };
const EXTRA_CF = { 'application/vnd.oma.lwm2m+tlv': 11542, 'application/vnd.oma.lwm2m+json': 11543,
  'application/vnd.oma.lwm2m+cbor': 11544, 'application/senml+json': 110, 'application/senml+cbor': 112,
  'application/senml-etch+json': 320 };
const formats = [{ name: 'lightweightm2m/text', value: 1541 }];
if (PATCHED) for (const [name, value] of Object.entries(EXTRA_CF)) { formats.push({ name, value }); CF[name] = value; }
const cfNum = name => (name === undefined ? undefined : (CF[name] !== undefined ? CF[name] : name));
const uintBuf = v => { const b = []; while (v > 0) { b.unshift(v & 0xff); v = Math.floor(v / 256); } return Buffer.from(b); };

// ---------- wire patches (coap Agent) ----------
// The library builds its registration query itself ('ep=..&lt=..&lwm2m=..&b=U'): b= is hard-coded.
const origRequest = coap.Agent.prototype.request;
coap.Agent.prototype.request = function (url) {
  if (url && typeof url.query === 'string' && /(^|&)lt=/.test(url.query)) {
    if (BINDING !== 'U') url.query = url.query.replace(/(^|&)b=U(&|$)/, `$1b=${BINDING}$2`);
    const req = origRequest.call(this, url);
    if (PATCHED && url.method === 'POST') req.setOption('Content-Format', Buffer.from([40]));
    // the library only listens for 'error', which coap fires after EXCHANGE_LIFETIME (~247 s)
    req.on('timeout', () => emit('error', { op: /(^|&)ep=/.test(url.query) ? 'register' : 'update', error: 'no response after CoAP retransmissions' }));
    return req;
  }
  return origRequest.call(this, url);
};
// --single-socket: send Update/Deregister/firmware GETs from the listener's socket (the port the
// server saw at Register) instead of a fresh ephemeral port each time.
let listenerServer = null;
if (SINGLE_SOCKET) {
  const OrigAgent = coap.Agent;
  coap.Agent = function (opts) {
    opts = Object.assign({}, opts);
    if (listenerServer && listenerServer._sock) opts.socket = listenerServer._sock;
    return new OrigAgent(opts);
  };
  coap.Agent.prototype = OrigAgent.prototype;
  const router = require('lwm2m-node-lib/lib/services/coapRouter');
  const origStart = router.start;
  let listenerInfo = null;
  router.start = function (cfg, cb) { // reuse the running listener instead of binding a second one
    if (listenerInfo && listenerServer._sock) return cb(null, listenerInfo);
    origStart(cfg, (err, info) => {
      if (!err) { listenerInfo = info; listenerServer = info.server; holdEarlyRequests(info.server); }
      cb(err, info);
    });
  };
  const origStop = router.stop;
  router.stop = function (info, cb) { if (info === listenerInfo) { listenerInfo = null; } origStop(info, cb); };
}

// A server may send its first request (the observe of /19/0/0) right after the 2.01, before the
// library has installed its handlers in the register callback; the library would drop it. Such
// requests wait until the handlers are in place, as a real client's would be.
const early = [];
let handlersReady = false;
function holdEarlyRequests(server) {
  const listeners = server.listeners('request');
  server.removeAllListeners('request');
  server.on('request', (req, res) => {
    if (handlersReady) listeners.forEach(l => l(req, res));
    else early.push(() => listeners.forEach(l => l(req, res)));
  });
}
function releaseEarlyRequests() {
  handlersReady = true;
  early.splice(0).forEach(run => run());
}

const lwm2m = require('lwm2m-node-lib/lib/lwm2m-client'); // avoids loading the server's mongoose deps
const registry = lwm2m.registry;

// ---------- TLV ----------
function tlvEncodeRes(id, buf) {
  const len = buf.length;
  let type = 0xC0 | (id > 255 ? 0x20 : 0);
  const hdr = [];
  if (len < 8) type |= len; else if (len < 256) { type |= 0x08; hdr.push(len); }
  else if (len < 65536) { type |= 0x10; hdr.push(len >> 8, len & 0xff); } else { type |= 0x18; hdr.push(len >> 16, (len >> 8) & 0xff, len & 0xff); }
  const idb = id > 255 ? [id >> 8, id & 0xff] : [id];
  return Buffer.concat([Buffer.from([type, ...idb, ...hdr]), buf]);
}
function tlvDecode(buf) {
  const out = []; let i = 0;
  while (i < buf.length) {
    const type = buf[i++]; const kind = type >> 6;
    let id = buf[i++]; if (type & 0x20) id = id * 256 + buf[i++];
    let len = type & 0x07; const lt = (type >> 3) & 3;
    if (lt) { len = 0; for (let k = 0; k < lt; k++) len = len * 256 + buf[i++]; }
    const value = buf.subarray(i, i + len); i += len;
    out.push({ kind: ['object-instance', 'resource-instance', 'multiple-resource', 'resource'][kind], id, value,
      children: kind === 0 || kind === 2 ? tlvDecode(value) : undefined });
  }
  return out;
}

// ---------- resource store ----------
// value kinds: 'str' | 'int' | 'opaque'
const store = new Map();
function def(path, kind, value) { store.set(path, { kind, value }); }
def('/3/0/0', 'str', 'nbhub-test'); def('/3/0/1', 'str', 'lwm2m-node-lib'); def('/3/0/2', 'str', EP);
def('/3/0/3', 'str', FW_VERSION); def('/3/0/9', 'int', 100); def('/3/0/16', 'str', BINDING);
def('/4/0/2', 'int', -92); def('/4/0/3', 'int', 9); def('/4/0/8', 'int', 46001);
def('/5/0/1', 'str', ''); def('/5/0/3', 'int', 0); def('/5/0/5', 'int', 0);
def('/5/0/6', 'str', ''); def('/5/0/7', 'str', '');
def('/19/0/0', 'opaque', Buffer.alloc(0)); def('/19/1/0', 'opaque', Buffer.alloc(0));
const EXEC = new Set(['/3/0/4', '/5/0/2']);
function bytesOf(e) {
  if (e.kind === 'opaque') return e.value;
  return Buffer.from(String(e.value));
}
function tlvBytesOf(e) {
  if (e.kind === 'int') { const b = Buffer.alloc(4); b.writeInt32BE(e.value); return b; }
  return bytesOf(e);
}
function splitPath(p) { const i = p.lastIndexOf('/'); return [p.slice(0, i), p.slice(i + 1)]; }
function libSet(path, value) { // mirror into the library registry (Register payload, Discover, native mode)
  const [obj, res] = splitPath(path);
  return new Promise(r => registry.setResource(obj, res, value, () => r()));
}
function libValue(e) { return e.kind === 'opaque' ? e.value : String(e.value); }

// ---------- patched handlers ----------
const readMod = require('lwm2m-node-lib/lib/services/client/read');
const writeMod = require('lwm2m-node-lib/lib/services/client/write');
const nativeRead = readMod.handle, nativeWrite = writeMod.handle;
const observers = new Map(); // path -> {res, accept}

function render(path, accept) {
  const m = path.match(/^\/(\d+)\/(\d+)(?:\/(\d+))?$/);
  if (!m) return { code: '4.05' };
  if (m[3] !== undefined) {
    if (EXEC.has(path)) return { code: '4.05' };
    const e = store.get(path); if (!e) return { code: '4.04' };
    if (accept === 11542) return { code: '2.05', cf: 11542, body: tlvEncodeRes(+m[3], tlvBytesOf(e)) };
    if (accept !== undefined && accept !== 0 && accept !== 42) return { code: '4.06' };
    if (e.kind === 'opaque') return accept === 0 ? { code: '4.06' } : { code: '2.05', cf: 42, body: e.value };
    return { code: '2.05', cf: 0, body: bytesOf(e) };
  }
  if (accept !== undefined && accept !== 11542) return { code: '4.06' };
  const parts = [];
  for (const [p, e] of store) if (p.startsWith(path + '/')) parts.push(tlvEncodeRes(+splitPath(p)[1], tlvBytesOf(e)));
  if (!parts.length) return { code: '4.04' };
  return { code: '2.05', cf: 11542, body: Buffer.concat(parts) };
}
function patchedRead(req, res, userHandler) {
  const path = req.urlObj.pathname.replace(/\/$/, '');
  const acceptName = req.headers.Accept;
  if (acceptName === 'application/link-format') return nativeRead(req, res, userHandler); // Discover
  const accept = cfNum(acceptName);
  const obsOpt = req.headers.Observe; // 0 register, 1 deregister, undefined plain read
  const r = render(path, accept);
  emit('read', { path, accept, observe: obsOpt, code: r.code, cf: r.cf, hex: r.body && r.body.toString('hex') });
  if (obsOpt === 1 && observers.has(path)) { const o = observers.get(path); observers.delete(path); o.res.end(); emit('observe-end', { path, why: 'observe=1' }); }
  if (r.code !== '2.05') { res.statusCode = r.code; res.code = r.code; return res.end(); }
  res.setOption('Content-Format', uintBuf(r.cf));
  if (obsOpt === 0) { // coap made res an ObserveWriteStream; it sets Observe=1,2,3.. itself
    const old = observers.get(path); if (old && old.res !== res) old.res.end();
    observers.set(path, { res, accept, token: req._packet.token.toString('hex') });
    res.on('finish', () => { if (observers.get(path) && observers.get(path).res === res) { observers.delete(path); emit('observe-end', { path, why: 'stream closed (RST/cancel/timeout)' }); } });
    emit('observe', { path, token: req._packet.token.toString('hex'), con: req._packet.confirmable });
    res.write(r.body);
  } else {
    res.code = '2.05'; res.end(r.body);
  }
}
function patchedWrite(req, res, userHandler) {
  if (req.url.indexOf('?') > 0) return nativeWrite(req, res, userHandler); // Write-Attributes
  const path = req.urlObj.pathname.replace(/\/$/, '');
  const cf = cfNum(req.headers['Content-Format']);
  const payload = req.payload;
  const m = path.match(/^\/(\d+)\/(\d+)(?:\/(\d+))?$/);
  const done = code => { res.code = code; res.end(); };
  if (!m) return done('4.05');
  const writes = [];
  if (m[3] !== undefined) {
    if (!store.has(path)) return done('4.04');
    if (cf === 11542) { const t = tlvDecode(payload); writes.push([path, t[0] ? t[0].value : Buffer.alloc(0)]); }
    else writes.push([path, payload]);
  } else {
    if (cf !== 11542) return done('4.15');
    for (const t of tlvDecode(payload)) {
      if (t.kind === 'object-instance') for (const c of t.children) writes.push([`/${m[1]}/${t.id}/${c.id}`, c.value]);
      else writes.push([`${path}/${t.id}`, t.value]);
    }
  }
  for (const [p, v] of writes) {
    const e = store.get(p) || { kind: 'opaque' };
    const value = e.kind === 'opaque' ? Buffer.from(v) : e.kind === 'int' ? (cf === 11542 ? v.readIntBE(0, v.length || 1) : parseInt(v.toString(), 10)) : v.toString('utf8');
    store.set(p, { kind: e.kind, value });
    libSet(p, libValue(store.get(p)));
    emit('write', { path: p, cf, len: v.length, hex: Buffer.from(v).toString('hex'), text: v.toString('latin1') });
    if (p === '/5/0/1') fwStart(store.get(p).value);
  }
  done('2.04');
}
if (PATCHED) {
  readMod.handle = patchedRead; writeMod.handle = patchedWrite;
  // coap 0.22 bug: after the first response to a NON observe, notifications go out with the ACK
  // type bit set (ack = !request.confirmable). Notifications are never ACKs.
  const OWS = require('coap/lib/observe_write_stream');
  const origDoSend = OWS.prototype._doSend;
  OWS.prototype._doSend = function (data) { origDoSend.call(this, data); this._packet.ack = false; };
}

// ---------- notifications ----------
async function setValue(path, value) {
  const e = store.get(path) || { kind: 'str' };
  store.set(path, { kind: e.kind, value });
  if (!PATCHED) { await libSet(path, libValue(store.get(path))); return; } // library's observer writes value.toString()
  await libSet(path, libValue(store.get(path)));
  const o = observers.get(path);
  if (o) {
    const r = render(path, o.accept);
    if (r.code === '2.05') { o.res.setOption('Content-Format', uintBuf(r.cf)); o.res.write(r.body); emit('notify', { path, cf: r.cf, hex: r.body.toString('hex') }); }
  }
}

// ---------- firmware (object 5) ----------
function setFw(state, result) {
  setValue('/5/0/3', state); if (result !== undefined) setValue('/5/0/5', result);
  emit('fw-state', { state, result });
}
function fwStart(uri) {
  if (!uri) { setFw(0, 0); return; } // empty URI = cancel / reset
  let u;
  try { u = new URL(uri); } catch (e) { setFw(0, 7); return; }
  if (u.protocol !== 'coap:') { setFw(0, 9); return; }
  setFw(1, 0);
  const started = Date.now();
  const opts = { agent: new coap.Agent({ type: 'udp4' }), hostname: u.hostname, port: parseInt(u.port || '5683', 10), pathname: u.pathname, method: 'GET' };
  if (u.search) opts.query = u.search.slice(1);
  if (FW_BLOCK) opts.options = { Block2: uintBuf((Math.log2(FW_BLOCK) - 4) & 7) || Buffer.alloc(1) }; // early negotiation, NUM=0
  const req = coap.request(opts);
  req.on('response', res => {
    if (!/^2\./.test(res.code)) { emit('fw-error', { code: res.code }); setFw(0, 4); return; }
    const body = res.payload;
    emit('fw-downloaded', { size: body.length, sha256: crypto.createHash('sha256').update(body).digest('hex'), ms: Date.now() - started });
    setFw(2, 0);
  });
  req.on('error', e => { emit('fw-error', { error: String(e && e.message || e) }); setFw(0, 4); });
  req.on('timeout', e => { emit('fw-error', { error: 'timeout' }); setFw(0, 4); });
  req.end();
}

// ---------- library wiring ----------
let deviceInfo = null;
function executeHandler(objectType, objectId, resourceId, payload, cb) {
  const path = `/${objectType}/${objectId}/${resourceId}`;
  emit('execute', { path, payload: payload || '' });
  if (path === '/5/0/2') {
    if (store.get('/5/0/3').value !== 2) return cb(); // lib always answers 2.04 (no way to return 4.05)
    setFw(3, 0);
    setTimeout(() => { setValue('/3/0/3', store.get('/5/0/7').value || 'updated'); setFw(0, 1); }, 200);
  }
  cb();
}
function setHandlers(info) {
  lwm2m.setHandler(info.serverInfo, 'execute', executeHandler);
  if (!PATCHED) {
    lwm2m.setHandler(info.serverInfo, 'write', (type, id, res, value, cb) => {
      const path = `/${type}/${id}/${res}`;
      emit('write', { path, native: true, text: value, hex: Buffer.from(String(value), 'utf8').toString('hex') });
      if (path === '/5/0/1') fwStart(value);
      cb();
    });
    lwm2m.setHandler(info.serverInfo, 'read', (type, id, res, value, cb) => { emit('read', { path: `/${type}/${id}/${res}`, native: true }); cb(null, value); });
  }
}
function createObjects(cb) {
  const objs = ['/3/0', '/4/0', '/5/0', '/19/0', '/19/1'];
  let n = objs.length;
  for (const o of objs) registry.create(o, async () => {
    if (--n) return;
    for (const [p, e] of store) await libSet(p, libValue(e));
    cb();
  });
}

// ---------- steps ----------
const steps = [];
let running = false;
function enqueue(line) { line = line.trim(); if (line) { steps.push(line); pump(); } }
async function pump() {
  if (running || !deviceInfo) return;
  running = true;
  while (steps.length) {
    const s = steps.shift();
    try { await runStep(s); } catch (e) { emit('error', { step: s, error: String(e && e.message || e) }); }
  }
  running = false;
}
function waitEv(name, ms) {
  const consumedKey = '_consumed_' + name;
  return new Promise((resolve, reject) => {
    const check = () => {
      if ((evCount[name] || 0) > (evCount[consumedKey] || 0)) {
        evCount[consumedKey] = (evCount[consumedKey] || 0) + 1; evWaiters.splice(evWaiters.indexOf(check), 1); clearTimeout(tm); resolve();
      }
    };
    const tm = setTimeout(() => { evWaiters.splice(evWaiters.indexOf(check), 1); reject(new Error('waitev timeout ' + name)); }, ms || 20000);
    evWaiters.push(check); check();
  });
}
function runStep(s) {
  const [cmd, ...restParts] = s.split(':'); const rest = restParts.join(':');
  switch (cmd) {
    case 'wait': return new Promise(r => setTimeout(r, parseInt(rest, 10)));
    case 'waitev': { const [name, ms] = rest.split(':'); return waitEv(name, parseInt(ms || '20000', 10)); }
    case 'notify': { const [p, hex] = rest.split('='); return setValue(p, Buffer.from(hex, 'hex')); }
    case 'set': { const i = rest.indexOf('='); return setValue(rest.slice(0, i), rest.slice(i + 1)); }
    case 'update': return new Promise(r => lwm2m.update(deviceInfo, (err, info) => {
      if (err) emit('error', { op: 'update', error: String(err.message || err) });
      else { deviceInfo = info || deviceInfo; setHandlers(deviceInfo); emit('updated', { location: deviceInfo.location, localPort: deviceInfo.localPort }); }
      r();
    }));
    case 'deregister': return new Promise(r => lwm2m.unregister(deviceInfo, err => {
      for (const o of observers.values()) o.res.end(); observers.clear();
      emit('deregistered', { error: err ? String(err.message || err) : undefined }); r();
    }));
    case 'exit': emit('exit', {}); setTimeout(() => process.exit(0), 50); return new Promise(() => {});
    default: throw new Error('unknown step ' + s);
  }
}

// ---------- main ----------
const clientConfig = { lifetime: LT, version: LWM2M_VER, logLevel: 'FATAL', observe: { period: 3000 },
  ipProtocol: 'udp4', serverProtocol: 'udp4', formats, writeFormat: 'lightweightm2m/text' };
lwm2m.init({ client: clientConfig });
logger.setLevel(process.env.LWC_LIBLOG || 'FATAL');
// The library binds its listener only after the 2.01, on the port Register went out from: a
// request the server sends at once would meet no listener. With --single-socket the listener is
// bound first and Register goes out from its socket (the CoAP server ignores responses there).
function listenFirst(cb) {
  if (!SINGLE_SOCKET) return cb();
  require('lwm2m-node-lib/lib/services/coapRouter').start(Object.assign({}, clientConfig, { port: 0 }), err => {
    if (err) { emit('error', { op: 'listen', error: String(err.message || err) }); process.exit(1); }
    cb();
  });
}
createObjects(() => listenFirst(() => {
  // NB: README says register(host, port, ep, cb); the code is register(host, port, url, ep, cb)
  lwm2m.register(HOST, PORT, '', EP, (err, info) => {
    if (err) { emit('error', { op: 'register', error: String(err.message || err), code: err.code }); process.exit(1); }
    deviceInfo = info; setHandlers(info); releaseEarlyRequests();
    emit('registered', { location: info.location, localPort: info.localPort, mode: MODE, binding: BINDING, lt: LT });
    if (SCRIPT) SCRIPT.split(';').forEach(enqueue);
    pump();
  });
}));
process.stdin.on('data', d => d.toString().split('\n').forEach(enqueue));
process.stdin.on('error', () => {});
