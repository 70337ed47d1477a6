import { test } from 'node:test';
import assert from 'node:assert/strict';
import { webcrypto } from 'node:crypto';
import { loadModule, makeEnv, makeStore } from './gm_shim.mjs';

const ID_RE = /^[A-Za-z0-9_-]{1,128}$/;  // what the proxy accepts (1-128, as Coze's examples)
const us = loadModule();

function splitId(id) {
  const m = id.match(/^(\d+)-([A-Za-z0-9_-]+)$/);
  assert.ok(m, `id ${id} is not <ms>-<base64url>`);
  return { ms: Number(m[1]), rand: m[2] };
}

test('makeUserId: format, time prefix, >= 128 random bits', () => {
  const { env } = makeEnv();
  const before = Date.now();
  const id = us.makeUserId(env);
  const after = Date.now();
  assert.match(id, ID_RE);
  const { ms, rand } = splitId(id);
  assert.ok(ms >= before && ms <= after, 'time prefix is the current time in ms');
  assert.doesNotMatch(rand, /=/, 'no padding');
  const decoded = Buffer.from(rand, 'base64url');
  assert.ok(decoded.length >= 16, `random part decodes to ${decoded.length} bytes`);
  assert.equal(Buffer.from(decoded).toString('base64url'), rand, 'canonical base64url');
});

test('makeUserId: base64url encoder agrees with Node for every length', () => {
  for (let n = 0; n < 40; n++) {
    const bytes = webcrypto.getRandomValues(new Uint8Array(n));
    assert.equal(us.base64url(bytes), Buffer.from(bytes).toString('base64url'));
  }
});

test('makeUserId: 1000 ids are all distinct', () => {
  const { env } = makeEnv({ now: () => 1700000000000 }); // same ms: only randomness differs
  const ids = new Set();
  for (let i = 0; i < 1000; i++) ids.add(us.makeUserId(env));
  assert.equal(ids.size, 1000);
});

test('makeUserId: does not use Math.random', () => {
  // the script's own realm gets a Math.random that throws, then one that is constant
  for (const prelude of ['Math.random = () => { throw new Error("Math.random used"); };', 'Math.random = () => 0.5;']) {
    const us2 = loadModule({}, undefined, prelude);
    const { env } = makeEnv({ now: () => 1700000000000 });
    const ids = new Set();
    for (let i = 0; i < 50; i++) ids.add(us2.makeUserId(env));
    assert.equal(ids.size, 50, prelude);
  }
});

test('makeUserId: the random part comes from crypto.getRandomValues', () => {
  let calls = 0;
  const fixed = { getRandomValues(buf) { calls++; buf.fill(0xff); return buf; } };
  const { env } = makeEnv({ crypto: fixed, now: () => 42000 });
  assert.equal(us.makeUserId(env), '42000-' + Buffer.alloc(16, 0xff).toString('base64url'));
  assert.equal(calls, 1);
});

test('makeUserId: refuses to work without crypto.getRandomValues', () => {
  const { env } = makeEnv({ crypto: {} });
  assert.throws(() => us.makeUserId(env), /getRandomValues/);
});

test('getOrCreateUserId: stored once, reused on the next load', () => {
  const store = makeStore();
  const first = us.getOrCreateUserId(makeEnv({ store }).env);
  assert.match(first, ID_RE);
  assert.equal(store.data.get('coze_user_id'), first);
  // a second page load: a fresh copy of the script, same GM store
  const us2 = loadModule();
  const second = us2.getOrCreateUserId(makeEnv({ store }).env);
  assert.equal(second, first);
  assert.equal(store.data.size, 1);
});

test('getOrCreateUserId: an invalid stored value is replaced', () => {
  for (const bad of ['', 'dot.in.it', 'has space in it', 'x'.repeat(129), 'user:12345678', '../../etc/passwd', 12345678901, null, { id: 'abcdefghij' }]) {
    const store = makeStore({ coze_user_id: bad });
    const id = us.getOrCreateUserId(makeEnv({ store }).env);
    assert.match(id, ID_RE);
    assert.notEqual(id, bad);
    splitId(id);
    assert.equal(store.data.get('coze_user_id'), id);
  }
});

test('getOrCreateUserId: a valid stored value is kept as is', () => {
  for (const kept of ['legacy_id-12345', 'UserId1', 'a']) {  // short ids, as Coze's examples use, are valid
    const store = makeStore({ coze_user_id: kept });
    assert.equal(us.getOrCreateUserId(makeEnv({ store }).env), kept);
  }
});

test('resetUserId: confirm true stores a new id and reloads', () => {
  const store = makeStore();
  const { env, rec } = makeEnv({ store, confirm: true });
  const old = us.getOrCreateUserId(env);
  const fresh = us.resetUserId(env);
  assert.match(fresh, ID_RE);
  assert.notEqual(fresh, old);
  assert.equal(store.data.get('coze_user_id'), fresh);
  assert.equal(rec.confirms.length, 1);
  assert.match(rec.confirms[0], /new, empty/i);
  assert.equal(rec.reloads, 1);
  assert.equal(us.getOrCreateUserId(env), fresh);
});

test('resetUserId: confirm false keeps the id and does not reload', () => {
  const store = makeStore();
  const { env, rec } = makeEnv({ store, confirm: false });
  const old = us.getOrCreateUserId(env);
  assert.equal(us.resetUserId(env), null);
  assert.equal(store.data.get('coze_user_id'), old);
  assert.equal(rec.reloads, 0);
});

test('resetUserId: without a proxy login the dialog promises a new, empty history', () => {
  for (const loginMode of [undefined, '', 'none']) {
    const { env, rec } = makeEnv({ confirm: false, config: { loginMode } });
    us.resetUserId(env);
    assert.match(rec.confirms[0], /new, empty chat history/);
    assert.doesNotMatch(rec.confirms[0], /login/);
  }
});

test('resetUserId: with a proxy login the dialog says the history follows the login', () => {
  for (const loginMode of ['htpasswd', 'ldap', 'single', 'any']) {
    const store = makeStore();
    const { env, rec } = makeEnv({ store, confirm: true, config: { loginMode } });
    const old = us.getOrCreateUserId(env);
    const fresh = us.resetUserId(env, { reload: false });
    assert.match(rec.confirms[0], /history follows your login/);
    assert.match(rec.confirms[0], /changes nothing about that history/);
    assert.match(rec.confirms[0], /log in to the proxy with another name/);
    assert.doesNotMatch(rec.confirms[0], /new, empty/);
    // the id is still renewed when asked (it only asks the proxy for credentials)
    assert.notEqual(fresh, old);
    assert.equal(store.data.get('coze_user_id'), fresh);
  }
});

test('showUserId: with a proxy login the alert says the history follows the login', () => {
  const withLogin = makeEnv({ config: { loginMode: 'htpasswd' } });
  us.showUserId(withLogin.env);
  assert.match(withLogin.rec.alerts[0], /history follows your login/);
  const without = makeEnv({ config: { loginMode: 'none' } });
  us.showUserId(without.env);
  assert.doesNotMatch(without.rec.alerts[0], /login/);
});

test('placeholder token is exactly user:<id>; onRefreshToken returns the same', async () => {
  const { env } = makeEnv();
  const id = us.getOrCreateUserId(env);
  assert.equal(us.placeholderToken(id), 'user:' + id);
  assert.throws(() => us.placeholderToken('bad id'));
  const opts = us.buildClientOptions({ botId: '7350000000000000001', title: 'T', nickname: '' }, id);
  assert.deepEqual(opts.auth.type, 'token');
  assert.equal(opts.auth.token, 'user:' + id);
  assert.equal(opts.auth.onRefreshToken(), 'user:' + id);
  assert.equal(await opts.auth.onRefreshToken('user:' + id), 'user:' + id);
  assert.equal(opts.auth.onRefreshToken(''), 'user:' + id);
  assert.deepEqual(JSON.parse(JSON.stringify(opts.config)), { bot_id: '7350000000000000001' });
  assert.deepEqual(JSON.parse(JSON.stringify(opts.componentProps)), { title: 'T' });
  assert.deepEqual(JSON.parse(JSON.stringify(opts.userInfo)), { id, nickname: 'me', url: '' });
});

test('buildClientOptions: appId selects an app config, nickname is used', () => {
  const opts = us.buildClientOptions({ botId: '', appId: '7400000000000000002', title: 'App', nickname: 'Ann' }, 'abcdefgh12');
  assert.deepEqual(JSON.parse(JSON.stringify(opts.config)), { type: 'app', appInfo: { appId: '7400000000000000002' } });
  assert.equal(opts.userInfo.nickname, 'Ann');
});

test('menu: three commands; show id alerts and copies; status page opens', () => {
  const store = makeStore();
  const { env, rec } = makeEnv({ store, confirm: false });
  const names = us.registerMenu(env);
  assert.deepEqual(rec.menu.map((m) => m.name), ['Show my coze-mitm id', 'Start a fresh identity\u2026', 'Open coze-mitm status page']);
  assert.deepEqual([...names], rec.menu.map((m) => m.name));
  rec.menu[0].fn();
  const id = store.data.get('coze_user_id');
  assert.match(id, ID_RE);
  assert.deepEqual(rec.clipboard, [id]);
  assert.equal(rec.alerts.length, 1);
  assert.ok(rec.alerts[0].includes(id));
  rec.menu[1].fn(); // confirm false
  assert.equal(store.data.get('coze_user_id'), id);
  assert.equal(rec.confirms.length, 1);
  rec.menu[2].fn();
  assert.deepEqual(rec.opened, ['http://coze.mitm/']);
});
