// ==UserScript==
// @name         coze-mitm chat
// @namespace    https://coze.mitm/
// @version      0.1.0
// @description  Coze Web Chat SDK on the pages you choose, with no credential in the page: the local coze-mitm proxy (127.0.0.1:8080) supplies a per-user token.
// @match        https://example.org/*
// @grant        GM_getValue
// @grant        GM_setValue
// @grant        GM_registerMenuCommand
// @grant        GM_xmlhttpRequest
// @grant        GM_setClipboard
// @grant        unsafeWindow
// @connect      coze.mitm
// @run-at       document-idle
// @noframes
// @downloadURL  http://coze.mitm/coze-chat.user.js
// @updateURL    http://coze.mitm/coze-chat.user.js
// ==/UserScript==

// The match line(s) above are placeholders: when coze-mitm serves this script at
// http://coze.mitm/coze-chat.user.js it writes one match line per allowed page origin
// (option coze_origins) and fills in the config block below.
//
// This script holds no credential of any kind. It hands the Coze Web Chat SDK the placeholder
// token "user:<id>", which only names this browser profile; the proxy swaps it for a real,
// per-user token on the way to the Coze API.

// Config block: the proxy replaces each value. Keep one key per line, the value a single-line
// JSON literal, followed by ", // @coze-mitm <key>".
const COZE_MITM_CONFIG = {
  botId: "", // @coze-mitm botId
  appId: "", // @coze-mitm appId   (for a Coze app/workflow instead of a bot; optional)
  title: "Coze", // @coze-mitm title
  sdkUrl: "https://lf-cdn.coze.cn/obj/unpkg/flow-platform/chat-app-sdk/1.2.0-beta.10/libs/cn/index.js", // @coze-mitm sdkUrl
  nickname: "", // @coze-mitm nickname
  statusUrl: "http://coze.mitm/status.json", // @coze-mitm statusUrl
  proxy: "127.0.0.1:8080", // @coze-mitm proxy   (the address the proxy listens on, for the notices)
  loginMode: "none", // @coze-mitm loginMode   ("none": users are this script's ids; otherwise the proxy login names them)
};

(function (CONFIG) {
  'use strict';

  const USER_ID_RE = /^[A-Za-z0-9_-]{1,128}$/;
  const STORE_KEY = 'coze_user_id';
  const RANDOM_BYTES = 16; // 128 bits
  const NOTICE_ID = 'coze-mitm-notice';
  const SDK_SCRIPT_ID = 'coze-mitm-sdk';
  const STATUS_TIMEOUT_MS = 4000;
  const SDK_TIMEOUT_MS = 20000;
  const SDK_POLL_MS = 100;
  const DEFAULT_STATUS_URL = 'http://coze.mitm/status.json';
  const DEFAULT_PROXY = '127.0.0.1:8080';
  const STATUS_PAGE_URL = 'http://coze.mitm/';
  const USERSCRIPT_URL = 'http://coze.mitm/coze-chat.user.js';
  const LOG_PREFIX = '[coze-mitm]';
  const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

  // ---------------------------------------------------------------- environment

  // Everything the script touches outside itself (GM_* API, page window, document, timers,
  // dialogs, crypto) goes through one `env` object, so tests can hand in shims.
  function defaultEnv() {
    const g = typeof globalThis !== 'undefined' ? globalThis : {};
    const win = typeof window !== 'undefined' ? window : g;
    const pageWindow = typeof unsafeWindow !== 'undefined' && unsafeWindow ? unsafeWindow : win;
    return {
      config: CONFIG,
      GM_getValue: typeof GM_getValue === 'function' ? GM_getValue : undefined,
      GM_setValue: typeof GM_setValue === 'function' ? GM_setValue : undefined,
      GM_registerMenuCommand: typeof GM_registerMenuCommand === 'function' ? GM_registerMenuCommand : undefined,
      GM_xmlhttpRequest: typeof GM_xmlhttpRequest === 'function' ? GM_xmlhttpRequest : undefined,
      GM_setClipboard: typeof GM_setClipboard === 'function' ? GM_setClipboard : undefined,
      cloneInto: typeof cloneInto === 'function' ? cloneInto : undefined, // Firefox content scripts
      window: win,
      pageWindow: pageWindow,
      document: typeof document !== 'undefined' ? document : undefined,
      location: undefined, // derived below: the page's location
      crypto: g.crypto || win.crypto,
      alert: function (msg) { return win.alert(msg); },
      confirm: function (msg) { return win.confirm(msg); },
      open: function (url) { return win.open(url, '_blank'); },
      reload: function () { return win.location.reload(); },
      setTimeout: function (fn, ms) { return setTimeout(fn, ms); },
      clearTimeout: function (t) { return clearTimeout(t); },
      now: function () { return Date.now(); },
      console: typeof console !== 'undefined' ? console : undefined,
    };
  }

  // Merge test/browser overrides over the defaults; idempotent.
  function resolveEnv(env) {
    if (env && env.__cozeMitmEnv) return env;
    const e = Object.assign(defaultEnv(), env || {});
    if (!e.pageWindow) e.pageWindow = e.window;
    if (!e.document && e.pageWindow) e.document = e.pageWindow.document;
    if (!e.location) e.location = (e.pageWindow && e.pageWindow.location) || (e.window && e.window.location);
    e.config = Object.assign({}, CONFIG, e.config || {});
    Object.defineProperty(e, '__cozeMitmEnv', { value: true, enumerable: false });
    return e;
  }

  function log(e, level, ...args) {
    if (e.console && typeof e.console[level] === 'function') e.console[level](LOG_PREFIX, ...args);
  }

  function need(e, name) {
    if (typeof e[name] !== 'function') {
      throw new Error('coze-mitm: ' + name + ' is not available; install the script with Tampermonkey or Violentmonkey (it needs @grant ' + name + ')');
    }
    return e[name];
  }

  // ---------------------------------------------------------------- user id

  function base64url(bytes) {
    let out = '';
    let i = 0;
    for (; i + 2 < bytes.length; i += 3) {
      const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
      out += B64URL[(n >> 18) & 63] + B64URL[(n >> 12) & 63] + B64URL[(n >> 6) & 63] + B64URL[n & 63];
    }
    const rest = bytes.length - i;
    if (rest === 1) {
      const n = bytes[i] << 16;
      out += B64URL[(n >> 18) & 63] + B64URL[(n >> 12) & 63];
    } else if (rest === 2) {
      const n = (bytes[i] << 16) | (bytes[i + 1] << 8);
      out += B64URL[(n >> 18) & 63] + B64URL[(n >> 12) & 63] + B64URL[(n >> 6) & 63];
    }
    return out;
  }

  function isValidUserId(id) {
    return typeof id === 'string' && USER_ID_RE.test(id);
  }

  // "<first-use time in ms>-<128 random bits, base64url, no padding>". Only a CSPRNG will do.
  function makeUserId(env) {
    const e = resolveEnv(env);
    const c = e.crypto;
    if (!c || typeof c.getRandomValues !== 'function') {
      throw new Error('coze-mitm: crypto.getRandomValues is not available, so no unguessable user id can be made');
    }
    const bytes = new Uint8Array(RANDOM_BYTES);
    c.getRandomValues(bytes);
    const id = String(Math.floor(Number(e.now()))) + '-' + base64url(bytes);
    if (!isValidUserId(id)) throw new Error('coze-mitm: made an invalid user id (clock broken?)');
    return id;
  }

  function getOrCreateUserId(env) {
    const e = resolveEnv(env);
    const stored = need(e, 'GM_getValue')(STORE_KEY, '');
    if (isValidUserId(stored)) return stored;
    if (stored) log(e, 'warn', 'stored user id is invalid; making a new one');
    const id = makeUserId(e);
    need(e, 'GM_setValue')(STORE_KEY, id);
    return id;
  }

  // With the proxy's login on (mitmproxy's proxyauth; the proxy fills in loginMode when it serves this
  // script), the proxy names each user by their login: the id below only asks for credentials.
  function followsLogin(e) {
    const mode = e.config.loginMode;
    return typeof mode === 'string' && mode !== '' && mode !== 'none';
  }

  const LOGIN_NOTE =
    'This proxy knows you by your proxy login, not by this browser\u2019s id: your Coze chat history ' +
    'follows your login, the same in every browser you log in from, whatever id this script has.';

  // Asks first; returns the new id, or null when the user said no. Reloads the page unless
  // opts.reload === false.
  function resetUserId(env, opts) {
    const e = resolveEnv(env);
    const ok = e.confirm(followsLogin(e)
      ? 'Start a fresh coze-mitm id?\n\n' + LOGIN_NOTE + ' A fresh id changes nothing about that history; ' +
        'for a separate history, log in to the proxy with another name.'
      : 'Start a fresh coze-mitm identity?\n\n' +
        'The Coze bot will treat you as a new user: a new, empty chat history. ' +
        'Your current history stays with the old id and cannot be reached from this browser afterwards ' +
        '(use "Show my coze-mitm id" first if you want to note it).'
    );
    if (!ok) return null;
    const id = makeUserId(e);
    need(e, 'GM_setValue')(STORE_KEY, id);
    if (!opts || opts.reload !== false) e.reload();
    return id;
  }

  function showUserId(env) {
    const e = resolveEnv(env);
    const id = getOrCreateUserId(e);
    let copied = false;
    if (typeof e.GM_setClipboard === 'function') {
      try { e.GM_setClipboard(id, 'text'); copied = true; } catch (err) { log(e, 'warn', 'clipboard:', err); }
    }
    e.alert('Your coze-mitm id:\n\n' + id + (copied ? '\n\n(copied to the clipboard)' : '') +
      (followsLogin(e) ? '\n\n' + LOGIN_NOTE : ''));
    return id;
  }

  function placeholderToken(id) {
    if (!isValidUserId(id)) throw new Error('coze-mitm: invalid user id');
    return 'user:' + id;
  }

  // ---------------------------------------------------------------- menu

  function registerMenu(env) {
    const e = resolveEnv(env);
    const reg = e.GM_registerMenuCommand;
    if (typeof reg !== 'function') return [];
    const items = [
      ['Show my coze-mitm id', function () { showUserId(e); }],
      ['Start a fresh identity\u2026', function () { resetUserId(e); }],
      ['Open coze-mitm status page', function () { e.open(STATUS_PAGE_URL); }],
    ];
    items.forEach(function (it) { reg(it[0], it[1]); });
    return items.map(function (it) { return it[0]; });
  }

  // ---------------------------------------------------------------- proxy check

  // Resolves (never rejects) to {ok: true, status} or {ok: false, kind: 'proxy' | 'origin', ...}.
  function checkProxy(env) {
    const e = resolveEnv(env);
    const url = e.config.statusUrl || DEFAULT_STATUS_URL;
    return new Promise(function (resolve) {
      let done = false;
      let timer = null;
      function finish(result) {
        if (done) return;
        done = true;
        if (timer !== null) e.clearTimeout(timer);
        resolve(result);
      }
      function fail(detail) { finish({ ok: false, kind: 'proxy', url: url, detail: detail }); }
      // Belt and braces: some managers never call ontimeout.
      timer = e.setTimeout(function () { fail('no answer from ' + url + ' within ' + (STATUS_TIMEOUT_MS / 1000) + ' s'); },
        STATUS_TIMEOUT_MS + 1000);
      try {
        need(e, 'GM_xmlhttpRequest')({
          method: 'GET',
          url: url,
          timeout: STATUS_TIMEOUT_MS,
          anonymous: true,
          headers: { Accept: 'application/json' },
          onload: function (res) { finish(interpretStatus(e, url, res)); },
          onerror: function () { fail('no answer from ' + url); },
          ontimeout: function () { fail('no answer from ' + url + ' within ' + (STATUS_TIMEOUT_MS / 1000) + ' s'); },
          onabort: function () { fail('the request to ' + url + ' was aborted'); },
        });
      } catch (err) {
        fail('could not ask ' + url + ': ' + (err && err.message ? err.message : String(err)));
      }
    });
  }

  function interpretStatus(e, url, res) {
    const code = res && res.status;
    if (typeof code === 'number' && (code < 200 || code > 299)) {
      return { ok: false, kind: 'proxy', url: url, detail: url + ' answered HTTP ' + code + ', not coze-mitm' };
    }
    let data = null;
    try {
      data = JSON.parse(res && typeof res.responseText === 'string' ? res.responseText : '');
    } catch (err) {
      data = null;
    }
    if (!data || typeof data !== 'object' || data.service !== 'coze-mitm') {
      return { ok: false, kind: 'proxy', url: url, detail: url + ' did not answer as coze-mitm (is the proxy running without the coze-mitm addons?)' };
    }
    const origin = e.location && e.location.origin;
    if (Array.isArray(data.origins)) {
      const origins = data.origins.filter(function (o) { return typeof o === 'string'; });
      if (!origin || origin === 'null' || origins.indexOf(origin) === -1) {
        return { ok: false, kind: 'origin', origin: String(origin), origins: origins, status: data };
      }
    }
    return { ok: true, status: data };
  }

  // The script's own config wins; a live status.json may fill an empty bot/app id.
  function effectiveConfig(config, status) {
    const c = Object.assign({}, config);
    const s = status && typeof status === 'object' ? status : {};
    c.botId = String(c.botId || '').trim();
    c.appId = String(c.appId || '').trim();
    if (!c.botId && !c.appId) {
      if (typeof s.bot_id === 'string') c.botId = s.bot_id.trim();
      if (typeof s.app_id === 'string') c.appId = s.app_id.trim();
    }
    return c;
  }

  // ---------------------------------------------------------------- notices

  function noticeText(kind, info) {
    const i = info || {};
    switch (kind) {
      case 'proxy':
        return 'This page does not go through the coze-mitm proxy, so the Coze chat was not loaded.\n' +
          'Set the browser\'s proxy to ' + (i.proxy || DEFAULT_PROXY) + ' (for HTTP and HTTPS, including the host coze.mitm), ' +
          'start the proxy with "python3 run_mitm.py" (Windows: "py run_mitm.py"), trust the mitmproxy CA from http://mitm.it, then reload this page.' +
          (i.detail ? '\n(' + i.detail + ')' : '');
      case 'origin': {
        if (!i.origin || i.origin === 'null') {
          return 'coze-mitm only serves pages with a real origin (not file:// or sandboxed pages), so the Coze chat was not loaded here.';
        }
        const list = (i.origins || []).concat([i.origin]).join(',');
        return 'coze-mitm does not allow this page\'s origin (' + i.origin + '), so the Coze chat was not loaded.\n' +
          'Add it: restart the proxy with --set coze_origins=' + list + ' then reload this page.';
      }
      case 'bot':
        return 'No Coze bot id is configured, so the Coze chat was not loaded.\n' +
          'Restart the proxy with --set coze_bot_id=<your bot id>, reinstall this userscript from ' +
          USERSCRIPT_URL + ', then reload this page.';
      case 'sdk':
        return 'The Coze Web Chat SDK could not be loaded' + (i.url ? ' from ' + i.url : '') + '.\n' +
          (i.detail ? i.detail + '\n' : '') +
          'A Content-Security-Policy on this page, an ad blocker or a network problem can block it.';
      default:
        return 'coze-mitm: ' + (i.detail || 'something went wrong') + '.';
    }
  }

  function removeNode(node) {
    if (!node) return;
    if (typeof node.remove === 'function') node.remove();
    else if (node.parentNode) node.parentNode.removeChild(node);
  }

  // One notice at a time: a new one replaces the old. Returns the element (or null without a page).
  function showNotice(env, kind, info) {
    const e = resolveEnv(env);
    const doc = e.document;
    if (!doc) return null;
    removeNode(doc.getElementById(NOTICE_ID));
    const text = noticeText(kind, Object.assign({ proxy: e.config && e.config.proxy }, info));
    const box = doc.createElement('div');
    box.id = NOTICE_ID;
    box.setAttribute('role', 'alert');
    box.setAttribute('data-kind', String(kind));
    box.style.cssText = 'position:fixed;right:16px;bottom:16px;z-index:2147483647;max-width:400px;' +
      'padding:12px 34px 12px 14px;background:#fff8e1;color:#222;border:1px solid #e0a800;border-radius:8px;' +
      'box-shadow:0 4px 16px rgba(0,0,0,.25);font:13px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;' +
      'white-space:pre-line;text-align:left;';
    const title = doc.createElement('strong');
    title.textContent = 'coze-mitm';
    title.style.cssText = 'display:block;margin-bottom:4px;';
    const body = doc.createElement('div');
    body.textContent = text;
    const close = doc.createElement('button');
    close.type = 'button';
    close.textContent = '\u00d7';
    close.title = 'Dismiss';
    close.setAttribute('aria-label', 'Dismiss');
    close.style.cssText = 'position:absolute;top:4px;right:6px;border:0;background:none;color:#555;' +
      'font-size:18px;line-height:1;cursor:pointer;padding:2px 4px;';
    close.addEventListener('click', function () { removeNode(box); });
    box.appendChild(title);
    box.appendChild(body);
    box.appendChild(close);
    (doc.body || doc.documentElement).appendChild(box);
    log(e, 'warn', text);
    return box;
  }

  // ---------------------------------------------------------------- SDK

  function buildClientOptions(config, id) {
    const c = config || {};
    const token = placeholderToken(id);
    const appId = String(c.appId || '').trim();
    const botId = String(c.botId || '').trim();
    return {
      config: appId ? { type: 'app', appInfo: { appId: appId } } : { bot_id: botId },
      componentProps: { title: String(c.title || 'Coze') },
      auth: {
        type: 'token',
        token: token,
        onRefreshToken: function () { return token; },
      },
      userInfo: { id: id, nickname: String(c.nickname || 'me'), url: '' },
    };
  }

  function sdkReady(pw) {
    const sdk = pw && pw.CozeWebSDK;
    return sdk && typeof sdk.WebChatClient === 'function' ? sdk : null;
  }

  // Appends <script id="coze-mitm-sdk" src=url> once and resolves with the page's CozeWebSDK.
  function loadSdk(env, url) {
    const e = resolveEnv(env);
    const pw = e.pageWindow;
    const doc = e.document;
    const ready = sdkReady(pw);
    if (ready) return Promise.resolve(ready);
    return new Promise(function (resolve, reject) {
      let done = false;
      let timer = null;
      const deadline = Number(e.now()) + SDK_TIMEOUT_MS;
      function settle(err, sdk) {
        if (done) return;
        done = true;
        if (timer !== null) e.clearTimeout(timer);
        if (err) reject(err); else resolve(sdk);
      }
      function poll() {
        timer = null;
        const sdk = sdkReady(pw);
        if (sdk) return settle(null, sdk);
        if (Number(e.now()) >= deadline) {
          return settle(new Error('window.CozeWebSDK did not appear within ' + (SDK_TIMEOUT_MS / 1000) + ' s'));
        }
        if (!done && timer === null) timer = e.setTimeout(poll, SDK_POLL_MS);
      }
      let s = doc.getElementById(SDK_SCRIPT_ID);
      const fresh = !s;
      if (fresh) {
        s = doc.createElement('script');
        s.id = SDK_SCRIPT_ID;
        s.async = true;
        s.src = url;
      }
      s.addEventListener('load', function () { if (timer !== null) { e.clearTimeout(timer); timer = null; } poll(); });
      s.addEventListener('error', function () { settle(new Error('the browser refused or failed to load it')); });
      if (fresh) (doc.head || doc.body || doc.documentElement).appendChild(s);
      poll();
    });
  }

  // In Firefox content-script mode the page cannot call our functions unless they are cloned in.
  function toPage(e, obj) {
    if (typeof e.cloneInto !== 'function') return obj;
    try {
      return e.cloneInto(obj, e.pageWindow, { cloneFunctions: true });
    } catch (err) {
      return obj;
    }
  }

  // ---------------------------------------------------------------- main

  // Resolves to {state: 'loaded' | 'skipped' | 'proxy' | 'origin' | 'bot' | 'sdk', ...}.
  async function main(env) {
    const e = resolveEnv(env);
    const pw = e.pageWindow;
    const doc = e.document;
    if (!pw || !doc) return { state: 'skipped', reason: 'no page' };
    if (pw.__cozeMitmLoaded || pw.__cozeMitmClient || doc.getElementById(SDK_SCRIPT_ID)) {
      return { state: 'skipped', reason: 'already loaded' };
    }
    pw.__cozeMitmLoaded = true;

    const id = getOrCreateUserId(e);
    registerMenu(e);

    const check = await checkProxy(e);
    if (!check.ok) {
      showNotice(e, check.kind, check);
      return { state: check.kind, id: id, check: check };
    }

    const cfg = effectiveConfig(e.config, check.status);
    if (!cfg.botId && !cfg.appId) {
      showNotice(e, 'bot');
      return { state: 'bot', id: id };
    }

    let sdk;
    try {
      sdk = await loadSdk(e, cfg.sdkUrl);
    } catch (err) {
      showNotice(e, 'sdk', { url: cfg.sdkUrl, detail: err && err.message });
      return { state: 'sdk', id: id, error: err };
    }
    if (pw.__cozeMitmClient) return { state: 'skipped', reason: 'already loaded' };

    const client = new sdk.WebChatClient(toPage(e, buildClientOptions(cfg, id)));
    pw.__cozeMitmClient = client;
    log(e, 'info', 'Coze chat loaded for', cfg.appId ? 'app ' + cfg.appId : 'bot ' + cfg.botId);
    return { state: 'loaded', id: id, client: client };
  }

  const api = {
    USER_ID_RE: USER_ID_RE,
    STORE_KEY: STORE_KEY,
    NOTICE_ID: NOTICE_ID,
    SDK_SCRIPT_ID: SDK_SCRIPT_ID,
    CONFIG: CONFIG,
    base64url: base64url,
    isValidUserId: isValidUserId,
    makeUserId: makeUserId,
    getOrCreateUserId: getOrCreateUserId,
    resetUserId: resetUserId,
    showUserId: showUserId,
    placeholderToken: placeholderToken,
    registerMenu: registerMenu,
    checkProxy: checkProxy,
    effectiveConfig: effectiveConfig,
    noticeText: noticeText,
    showNotice: showNotice,
    buildClientOptions: buildClientOptions,
    loadSdk: loadSdk,
    resolveEnv: resolveEnv,
    main: main,
  };

  if (typeof module !== 'undefined' && module && module.exports && typeof GM_info === 'undefined') {
    module.exports = api; // Node (tests): export, do not run
  } else {
    main().catch(function (err) {
      try { showNotice(undefined, 'error', { detail: err && err.message ? err.message : String(err) }); } catch (e2) { /* no page */ }
      if (typeof console !== 'undefined') console.error(LOG_PREFIX, err);
    });
  }
})(COZE_MITM_CONFIG);
