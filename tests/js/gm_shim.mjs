// Minimal shims for testing userscript/coze-chat.user.js in Node: a GM_* store, a fake DOM
// (createElement / appendChild / getElementById / body), a scripted GM_xmlhttpRequest and a fake
// Coze Web Chat SDK. No npm packages.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { webcrypto } from 'node:crypto';
import vm from 'node:vm';

export const SCRIPT_PATH = fileURLToPath(new URL('../../userscript/coze-chat.user.js', import.meta.url));
export const SCRIPT_TEXT = readFileSync(SCRIPT_PATH, 'utf8');

// ------------------------------------------------------------------ fake DOM

export class FakeElement {
  constructor(doc, tagName) {
    this.ownerDocument = doc;
    this.tagName = String(tagName).toUpperCase();
    this.children = [];
    this.parentNode = null;
    this.attributes = {};
    this.style = { cssText: '' };
    this.listeners = {};
    this.id = '';
    this._text = '';
  }
  get textContent() {
    return this._text + this.children.map((c) => c.textContent).join('');
  }
  set textContent(v) {
    this.children = [];
    this._text = String(v);
  }
  setAttribute(k, v) { this.attributes[k] = String(v); if (k === 'id') this.id = String(v); }
  getAttribute(k) { return k === 'id' ? this.id : (k in this.attributes ? this.attributes[k] : null); }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  removeEventListener(type, fn) { this.listeners[type] = (this.listeners[type] || []).filter((f) => f !== fn); }
  dispatch(type) {
    const ev = { type, target: this };
    for (const fn of this.listeners[type] || []) fn.call(this, ev);
    if (typeof this['on' + type] === 'function') this['on' + type](ev);
  }
  click() { this.dispatch('click'); }
  appendChild(child) {
    if (child.parentNode) child.parentNode.removeChild(child);
    child.parentNode = this;
    this.children.push(child);
    this.ownerDocument._onAppend(child);
    return child;
  }
  removeChild(child) {
    this.children = this.children.filter((c) => c !== child);
    child.parentNode = null;
    return child;
  }
  remove() { if (this.parentNode) this.parentNode.removeChild(this); }
  *walk() { yield this; for (const c of this.children) yield* c.walk(); }
}

export class FakeDocument {
  constructor() {
    this.documentElement = new FakeElement(this, 'html');
    this.head = new FakeElement(this, 'head');
    this.body = new FakeElement(this, 'body');
    this.documentElement.children.push(this.head, this.body);
    this.head.parentNode = this.documentElement;
    this.body.parentNode = this.documentElement;
    this.onAppend = null; // hook(el)
  }
  createElement(tag) { return new FakeElement(this, tag); }
  getElementById(id) {
    for (const el of this.documentElement.walk()) if (el.id === id) return el;
    return null;
  }
  all() { return [...this.documentElement.walk()]; }
  byTag(tag) { return this.all().filter((el) => el.tagName === tag.toUpperCase()); }
  _onAppend(el) { if (this.onAppend) this.onAppend(el); }
}

// ------------------------------------------------------------------ GM store

export function makeStore(initial = {}) {
  const data = new Map(Object.entries(initial));
  return {
    data,
    GM_getValue: (k, d) => (data.has(k) ? data.get(k) : d),
    GM_setValue: (k, v) => { data.set(k, v); },
  };
}

// ------------------------------------------------------------------ fake SDK

export function makeFakeSdk() {
  const clients = [];
  class WebChatClient {
    constructor(options) { this.options = options; clients.push(this); }
  }
  return { sdk: { WebChatClient }, clients };
}

// ------------------------------------------------------------------ env

/**
 * opts:
 *   store       makeStore() result (share it to simulate two page loads)
 *   origin      page origin (default https://example.org)
 *   status      object (answered as JSON 200) | 'error' | 'timeout' | 'abort' | 'throw'
 *               | {http: 404, text: '...'} | function(details) handling the request itself
 *   sdk         'load' (default) | 'error' | 'none' (script appended but never loads)
 *   confirm     value confirm() returns (default true)
 *   config      config overrides (default botId '7350000000000000001')
 */
export function makeEnv(opts = {}) {
  const store = opts.store || makeStore();
  const document = new FakeDocument();
  const origin = opts.origin ?? 'https://example.org';
  const rec = { requests: [], menu: [], alerts: [], confirms: [], clipboard: [], opened: [], reloads: 0, scripts: [], logs: [] };
  const fake = makeFakeSdk();
  rec.clients = fake.clients;
  const pageWindow = { location: { origin, href: origin + '/', reload() { rec.reloads++; } }, document };
  const sdkMode = opts.sdk || 'load';
  document.onAppend = (el) => {
    if (el.tagName !== 'SCRIPT') return;
    rec.scripts.push(el);
    if (sdkMode === 'load') setImmediate(() => { pageWindow.CozeWebSDK = fake.sdk; el.dispatch('load'); });
    else if (sdkMode === 'error') setImmediate(() => el.dispatch('error'));
  };
  const status = 'status' in opts ? opts.status : { service: 'coze-mitm', origins: [origin] };
  const GM_xmlhttpRequest = (details) => {
    rec.requests.push(details);
    if (typeof status === 'function') return status(details);
    if (status === 'throw') throw new Error('GM_xmlhttpRequest exploded');
    setImmediate(() => {
      if (status === 'error') details.onerror?.({ status: 0 });
      else if (status === 'timeout') details.ontimeout?.({});
      else if (status === 'abort') details.onabort?.({});
      else if (status && status.http) details.onload?.({ status: status.http, responseText: status.text ?? '' });
      else details.onload?.({ status: 200, responseText: typeof status === 'string' ? status : JSON.stringify(status) });
    });
    return { abort() {} };
  };
  const env = {
    config: { botId: '7350000000000000001', ...(opts.config || {}) },
    GM_getValue: store.GM_getValue,
    GM_setValue: store.GM_setValue,
    GM_registerMenuCommand: (name, fn) => { rec.menu.push({ name, fn }); return rec.menu.length; },
    GM_xmlhttpRequest,
    GM_setClipboard: (text) => { rec.clipboard.push(text); },
    window: pageWindow,
    pageWindow,
    document,
    crypto: opts.crypto || webcrypto,
    alert: (m) => { rec.alerts.push(m); },
    confirm: (m) => { rec.confirms.push(m); return opts.confirm ?? true; },
    open: (u) => { rec.opened.push(u); },
    reload: () => { rec.reloads++; },
    now: opts.now || (() => Date.now()),
    console: { log() {}, info: (...a) => rec.logs.push(a), warn: (...a) => rec.logs.push(a), error: (...a) => rec.logs.push(a) },
  };
  return { env, rec, store, document, pageWindow, fakeSdk: fake };
}

// ------------------------------------------------------------------ loading the script

/**
 * Runs the userscript in a fresh vm context as a CommonJS module; returns its exports.
 * prelude: code run in that context first (e.g. to replace its Math.random).
 */
export function loadModule(extraGlobals = {}, text = SCRIPT_TEXT, prelude = '') {
  const module = { exports: {} };
  const ctx = vm.createContext({ module, exports: module.exports, console, setTimeout, clearTimeout, crypto: webcrypto, ...extraGlobals });
  if (prelude) vm.runInContext(prelude, ctx);
  vm.runInContext(text, ctx, { filename: SCRIPT_PATH });
  return module.exports;
}

/** Runs the userscript as a userscript manager would (globals GM_*, window, document, no module). */
export function runAsUserscript(globals, text = SCRIPT_TEXT) {
  const ctx = vm.createContext({ console, setTimeout, clearTimeout, crypto: webcrypto, ...globals });
  vm.runInContext(text, ctx, { filename: SCRIPT_PATH });
  return ctx;
}

/** The parsed metadata block: {directive: [values...]}. */
export function parseMetadata(text = SCRIPT_TEXT) {
  const m = text.match(/\/\/ ==UserScript==\n([\s\S]*?)\n\/\/ ==\/UserScript==/);
  if (!m) return null;
  const meta = {};
  for (const line of m[1].split('\n')) {
    const mm = line.match(/^\/\/\s+@(\S+)(?:\s+(.*?))?\s*$/);
    if (mm) (meta[mm[1]] ||= []).push(mm[2] ?? '');
  }
  return meta;
}

export const tick = () => new Promise((r) => setImmediate(r));
