import { test } from 'node:test';
import assert from 'node:assert/strict';
import { loadModule, makeEnv, makeStore, runAsUserscript, makeFakeSdk, FakeDocument, tick } from './gm_shim.mjs';

const us = loadModule();
const plain = (o) => JSON.parse(JSON.stringify(o));

function notice(document) {
  return document.getElementById('coze-mitm-notice');
}

function assertNotLoaded(rec, pageWindow) {
  assert.equal(rec.scripts.length, 0, 'no SDK <script> appended');
  assert.equal(rec.clients.length, 0, 'no WebChatClient made');
  assert.equal(pageWindow.CozeWebSDK, undefined);
}

test('proxied, origin allowed, bot id set: loads the SDK and makes one client', async () => {
  const store = makeStore();
  const { env, rec, document, pageWindow } = makeEnv({ store, config: { title: 'Helper', nickname: 'Ann' } });
  const r = await us.main(env);
  assert.equal(r.state, 'loaded');
  assert.equal(rec.requests.length, 1);
  const req = rec.requests[0];
  assert.equal(req.method, 'GET');
  assert.equal(req.url, 'http://coze.mitm/status.json');
  assert.equal(req.timeout, 4000);
  const script = document.getElementById('coze-mitm-sdk');
  assert.ok(script, 'SDK script element');
  assert.equal(script.tagName, 'SCRIPT');
  assert.equal(script.src, 'https://lf-cdn.coze.cn/obj/unpkg/flow-platform/chat-app-sdk/1.2.0-beta.10/libs/cn/index.js');
  assert.equal(rec.clients.length, 1);
  const id = store.data.get('coze_user_id');
  const o = rec.clients[0].options;
  assert.deepEqual(plain(o), {
    config: { bot_id: '7350000000000000001' },
    componentProps: { title: 'Helper' },
    auth: { type: 'token', token: 'user:' + id },
    userInfo: { id, nickname: 'Ann', url: '' },
  });
  assert.equal(o.auth.onRefreshToken(), 'user:' + id);
  assert.equal(pageWindow.__cozeMitmLoaded, true);
  assert.equal(pageWindow.__cozeMitmClient, rec.clients[0]);
  assert.equal(notice(document), null, 'no notice when all is well');
  assert.equal(rec.menu.length, 3);
});

test('status request errors: proxy notice, SDK not loaded', async () => {
  for (const status of ['error', 'timeout', 'abort', 'throw']) {
    const { env, rec, document, pageWindow } = makeEnv({ status });
    const r = await us.main(env);
    assert.equal(r.state, 'proxy', status);
    const n = notice(document);
    assert.ok(n, `notice for ${status}`);
    assert.equal(n.parentNode, document.body);
    assert.equal(n.getAttribute('data-kind'), 'proxy');
    assert.match(n.textContent, /127\.0\.0\.1:8080/);
    assert.match(n.textContent, /http:\/\/mitm\.it/);
    assert.match(n.textContent, /reload/i);
    assert.match(n.style.cssText, /position:fixed/);
    assertNotLoaded(rec, pageWindow);
    assert.equal(rec.menu.length, 3, 'menu still there, e.g. to show the id');
  }
});

test('the proxy notice names the address the proxy really listens on (filled in by the proxy)', async () => {
  const { env, document } = makeEnv({ status: 'error', config: { proxy: '127.0.0.1:41943' } });
  const r = await us.main(env);
  assert.equal(r.state, 'proxy');
  assert.match(notice(document).textContent, /Set the browser's proxy to 127\.0\.0\.1:41943 /);
  assert.doesNotMatch(notice(document).textContent, /8080/);
});

test('status answered by something that is not coze-mitm: proxy notice, SDK not loaded', async () => {
  for (const status of [{ http: 502, text: 'Bad gateway' }, { http: 200, text: '<html>hello</html>' },
    { service: 'something-else', origins: ['https://example.org'] }, 'null', '"coze-mitm"', { http: 404, text: '{"service":"coze-mitm"}' }]) {
    const { env, rec, document, pageWindow } = makeEnv({ status });
    const r = await us.main(env);
    assert.equal(r.state, 'proxy', JSON.stringify(status));
    assert.match(notice(document).textContent, /127\.0\.0\.1:8080/);
    assertNotLoaded(rec, pageWindow);
  }
});

test('a status request that never answers gives up after the timeout (no hang)', async () => {
  const timers = [];
  const { env, rec, document, pageWindow } = makeEnv({ status: () => ({}) }); // never calls back
  env.setTimeout = (fn, ms) => { timers.push({ fn, ms }); return timers.length; };
  env.clearTimeout = () => {};
  const p = us.main(env);
  await tick();
  assert.equal(timers.length, 1);
  assert.ok(timers[0].ms >= 4000 && timers[0].ms <= 6000, `fallback timer ${timers[0].ms} ms`);
  timers[0].fn();
  const r = await p;
  assert.equal(r.state, 'proxy');
  assert.match(notice(document).textContent, /127\.0\.0\.1:8080/);
  assertNotLoaded(rec, pageWindow);
});

test('origin not allowed: notice says to add it with --set coze_origins, SDK not loaded', async () => {
  const { env, rec, document, pageWindow } = makeEnv({
    origin: 'https://blog.example.net',
    status: { service: 'coze-mitm', origins: ['https://www.coze.cn', 'https://example.org'] },
  });
  const r = await us.main(env);
  assert.equal(r.state, 'origin');
  const n = notice(document);
  assert.equal(n.getAttribute('data-kind'), 'origin');
  assert.match(n.textContent, /--set coze_origins=https:\/\/www\.coze\.cn,https:\/\/example\.org,https:\/\/blog\.example\.net/);
  assert.match(n.textContent, /https:\/\/blog\.example\.net/);
  assertNotLoaded(rec, pageWindow);
});

test('origin check is exact (no prefix or port confusion) and an empty list allows nothing', async () => {
  for (const [origin, origins] of [
    ['https://example.org:8443', ['https://example.org']],
    ['http://example.org', ['https://example.org']],
    ['https://example.org.evil.test', ['https://example.org']],
    ['https://example.org', []],
    ['null', ['null']],
  ]) {
    const { env, rec, document, pageWindow } = makeEnv({ origin, status: { service: 'coze-mitm', origins } });
    const r = await us.main(env);
    assert.equal(r.state, 'origin', origin);
    assert.ok(notice(document));
    assertNotLoaded(rec, pageWindow);
  }
});

test('status without an origins field: the proxy decides, SDK loads', async () => {
  const { env, rec } = makeEnv({ status: { service: 'coze-mitm' } });
  assert.equal((await us.main(env)).state, 'loaded');
  assert.equal(rec.clients.length, 1);
});

test('no bot id and no app id: notice says --set coze_bot_id, SDK not loaded', async () => {
  const { env, rec, document, pageWindow } = makeEnv({ config: { botId: '', appId: '' } });
  const r = await us.main(env);
  assert.equal(r.state, 'bot');
  const n = notice(document);
  assert.equal(n.getAttribute('data-kind'), 'bot');
  assert.match(n.textContent, /--set coze_bot_id=/);
  assertNotLoaded(rec, pageWindow);
});

test('empty config bot id may be filled from status.json bot_id', async () => {
  const { env, rec } = makeEnv({ config: { botId: '' }, status: { service: 'coze-mitm', origins: ['https://example.org'], bot_id: '7399' } });
  assert.equal((await us.main(env)).state, 'loaded');
  assert.deepEqual(plain(rec.clients[0].options.config), { bot_id: '7399' });
});

test('appId set: the client gets an app config', async () => {
  const { env, rec } = makeEnv({ config: { botId: '', appId: '7400000000000000002' } });
  assert.equal((await us.main(env)).state, 'loaded');
  assert.deepEqual(plain(rec.clients[0].options.config), { type: 'app', appInfo: { appId: '7400000000000000002' } });
});

test('SDK fails to load: sdk notice, no client', async () => {
  const { env, rec, document } = makeEnv({ sdk: 'error' });
  const r = await us.main(env);
  assert.equal(r.state, 'sdk');
  assert.equal(notice(document).getAttribute('data-kind'), 'sdk');
  assert.match(notice(document).textContent, /lf-cdn\.coze\.cn/);
  assert.equal(rec.clients.length, 0);
});

test('no double injection: main twice (sequential and concurrent) makes one script and one client', async () => {
  const { env, rec, document } = makeEnv();
  assert.equal((await us.main(env)).state, 'loaded');
  assert.equal((await us.main(env)).state, 'skipped');
  assert.equal(rec.scripts.length, 1);
  assert.equal(document.byTag('script').length, 1);
  assert.equal(rec.clients.length, 1);
  assert.equal(rec.requests.length, 1);
  assert.equal(rec.menu.length, 3, 'menu registered once');

  const b = makeEnv();
  const [r1, r2] = await Promise.all([us.main(b.env), us.main(b.env)]);
  assert.deepEqual([r1.state, r2.state].sort(), ['loaded', 'skipped']);
  assert.equal(b.rec.scripts.length, 1);
  assert.equal(b.rec.clients.length, 1);

  // a second copy of the script (another manager, a re-install) on the same page
  const us2 = loadModule();
  assert.equal((await us2.main(env)).state, 'skipped');
  assert.equal(rec.clients.length, 1);
});

test('an SDK script already in the page (left by an earlier run) is not injected again', async () => {
  const { env, rec, document } = makeEnv();
  const s = document.createElement('script');
  s.id = 'coze-mitm-sdk';
  document.head.appendChild(s);
  rec.scripts.length = 0;
  assert.equal((await us.main(env)).state, 'skipped');
  assert.equal(rec.requests.length, 0);
  assert.equal(rec.clients.length, 0);
});

test('notice: only one at a time, and the close button dismisses it', () => {
  const { env, document } = makeEnv();
  us.showNotice(env, 'proxy', {});
  const n = us.showNotice(env, 'bot', {});
  assert.equal(document.all().filter((el) => el.id === 'coze-mitm-notice').length, 1);
  assert.equal(n.getAttribute('data-kind'), 'bot');
  const button = n.children.find((c) => c.tagName === 'BUTTON');
  assert.ok(button, 'close button');
  button.click();
  assert.equal(document.getElementById('coze-mitm-notice'), null);
});

test('notice text is set as text, not HTML', () => {
  const { env, document } = makeEnv();
  const n = us.showNotice(env, 'origin', { origin: 'https://x.test', origins: ['<img src=x onerror=alert(1)>'] });
  assert.ok(n.textContent.includes('<img src=x onerror=alert(1)>'));
  assert.equal(document.byTag('img').length, 0);
  assert.equal(n.innerHTML, undefined);
});

test('as a userscript (no module, GM_* globals, unsafeWindow): runs main by itself', async () => {
  const store = new Map();
  const document = new FakeDocument();
  const fake = makeFakeSdk();
  const pageWindow = { location: { origin: 'https://example.org', reload() {} }, document };
  const requests = [];
  document.onAppend = (el) => {
    if (el.tagName === 'SCRIPT') setImmediate(() => { pageWindow.CozeWebSDK = fake.sdk; el.dispatch('load'); });
  };
  const filled = (await import('./gm_shim.mjs')).SCRIPT_TEXT.replace(/^( {2}botId: )"".*$/m, '$1"7350000000000000001", // @coze-mitm botId');
  runAsUserscript({
    GM_info: { script: { name: 'coze-mitm chat' } },
    GM_getValue: (k, d) => (store.has(k) ? store.get(k) : d),
    GM_setValue: (k, v) => store.set(k, v),
    GM_registerMenuCommand: () => {},
    GM_setClipboard: () => {},
    GM_xmlhttpRequest: (d) => { requests.push(d); setImmediate(() => d.onload({ status: 200, responseText: '{"service":"coze-mitm","origins":["https://example.org"]}' })); },
    window: { location: pageWindow.location, alert() {}, confirm() { return false; }, open() {} },
    unsafeWindow: pageWindow,
    document,
  }, filled);
  for (let i = 0; i < 20 && fake.clients.length === 0; i++) await tick();
  assert.equal(requests.length, 1);
  assert.equal(fake.clients.length, 1);
  const id = store.get('coze_user_id');
  assert.match(id, /^\d+-[A-Za-z0-9_-]{22,}$/);
  assert.equal(fake.clients[0].options.auth.token, 'user:' + id);
  assert.equal(pageWindow.__cozeMitmLoaded, true, 'guard set on the page window (unsafeWindow)');
});
