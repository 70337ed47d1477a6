import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SCRIPT_TEXT, parseMetadata, loadModule } from './gm_shim.mjs';

test('metadata block has every required directive', () => {
  const meta = parseMetadata();
  assert.ok(meta, 'metadata block present');
  assert.ok(SCRIPT_TEXT.startsWith('// ==UserScript==\n'), 'metadata block comes first');
  assert.deepEqual(meta.name, ['coze-mitm chat']);
  assert.deepEqual(meta.namespace, ['https://coze.mitm/']);
  assert.match(meta.version?.[0] ?? '', /^\d+(\.\d+)*$/);
  assert.ok(meta.description?.[0], '@description');
  assert.ok(meta.match?.length >= 1, '@match');
  for (const m of meta.match) assert.match(m, /^https?:\/\/[^/\s]+\/\*$/);
  for (const g of ['GM_getValue', 'GM_setValue', 'GM_registerMenuCommand', 'GM_xmlhttpRequest', 'GM_setClipboard']) {
    assert.ok(meta.grant.includes(g), `@grant ${g}`);
  }
  assert.ok(meta.connect.includes('coze.mitm'), '@connect coze.mitm');
  assert.deepEqual(meta['run-at'], ['document-idle']);
  assert.deepEqual(meta.noframes, ['']);
  assert.deepEqual(meta.downloadURL, ['http://coze.mitm/coze-chat.user.js']);
  assert.deepEqual(meta.updateURL, ['http://coze.mitm/coze-chat.user.js']);
});

test('@description names the proxy as one (host:port) the proxy replaces when it serves the script', () => {
  const [description] = parseMetadata().description;
  assert.deepEqual(description.match(/\([^()\s]+\)/g), ['(127.0.0.1:8080)']);
});

test('the script contains no secret or credential', () => {
  for (const bad of ['pat_', 'czs_', 'cztei_', 'BEGIN', 'PRIVATE KEY', 'access_token', 'Bearer', 'private_key']) {
    assert.ok(!SCRIPT_TEXT.includes(bad), `script must not contain ${JSON.stringify(bad)}`);
  }
  assert.ok(!/Math\.random/.test(SCRIPT_TEXT), 'no Math.random');
});

test('config block: one marked single-line JSON literal per key, replaceable by regex', () => {
  const keys = ['botId', 'appId', 'title', 'sdkUrl', 'nickname', 'statusUrl', 'proxy', 'loginMode'];
  const re = /^ {2}(\w+): (.*), \/\/ @coze-mitm (\w+)\b.*$/gm;
  const found = {};
  for (const m of SCRIPT_TEXT.matchAll(re)) {
    assert.equal(m[1], m[3], 'key and marker agree');
    found[m[1]] = JSON.parse(m[2]);
  }
  assert.deepEqual(Object.keys(found).sort(), [...keys].sort());
  assert.deepEqual(found, {
    botId: '', appId: '', title: 'Coze',
    sdkUrl: 'https://lf-cdn.coze.cn/obj/unpkg/flow-platform/chat-app-sdk/1.2.0-beta.10/libs/cn/index.js',
    nickname: '', statusUrl: 'http://coze.mitm/status.json', proxy: '127.0.0.1:8080', loginMode: 'none',
  });
  assert.match(SCRIPT_TEXT, /^const COZE_MITM_CONFIG = \{\n/m);

  // what the proxy will do: fill values with JSON, then the script still parses and sees them
  const values = { botId: '7350000000000000001', title: 'He said "hi" \\ </script>', nickname: 'Zoë' };
  let filled = SCRIPT_TEXT;
  for (const [k, v] of Object.entries(values)) {
    filled = filled.replace(new RegExp(`^( {2}${k}: ).*?(, // @coze-mitm ${k}\\b.*)$`, 'm'), (_, a, b) => a + JSON.stringify(v) + b);
  }
  filled = filled.replace(/^\/\/ @match .*$/m, '// @match        https://a.example/*\n// @match        http://localhost:8000/*');
  const us = loadModule({}, filled);
  assert.equal(us.CONFIG.botId, values.botId);
  assert.equal(us.CONFIG.title, values.title);
  assert.equal(us.CONFIG.nickname, values.nickname);
  assert.deepEqual(parseMetadata(filled).match, ['https://a.example/*', 'http://localhost:8000/*']);
});

test('exports the documented functions in Node instead of running', () => {
  const us = loadModule();
  for (const f of ['makeUserId', 'getOrCreateUserId', 'resetUserId', 'showUserId', 'placeholderToken', 'registerMenu',
    'checkProxy', 'showNotice', 'noticeText', 'buildClientOptions', 'loadSdk', 'effectiveConfig', 'isValidUserId', 'main']) {
    assert.equal(typeof us[f], 'function', f);
  }
});
