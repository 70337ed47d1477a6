// The official Coze JS SDK (@coze/api) in Node, used the way its users drive it, through coze-mitm.
// tests/test_node_sdk.py runs it as a subprocess:
//     node tests/js/sdk/node_client.mjs <scenario> '<json params>'
// and reads ONE JSON line from stdout. Not a *.test.mjs file: `node --test tests/js/` leaves it alone.
//
// The client set-up is the one the README documents for Node: the SDK's default transport, i.e.
// axios' http adapter for ordinary calls (honours `proxy`) and Node's fetch (undici) for streamed
// calls (ignores `proxy` and HTTP(S)_PROXY: it needs a `dispatcher`).
import { createReadStream, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

import { CozeAPI, ChatEventType, RoleType } from '@coze/api';
import { ProxyAgent } from 'undici';

// Without p.proxy: no proxy at all, the proxy's own address as baseURL / baseWsURL (coze-mitm's "direct" use).
function client(user, p) {
  const options = {
    token: `user:${user}`, // the placeholder: coze-mitm swaps it for this user's own Coze token
    baseURL: p.baseURL,
    baseWsURL: p.baseWsURL,
  };
  if (p.proxy) {
    const proxy = new URL(p.proxy);
    options.axiosOptions = {
      proxy: { protocol: 'http', host: proxy.hostname, port: Number(proxy.port) },
      fetchOptions: { dispatcher: new ProxyAgent(p.proxy) },
    };
  }
  return new CozeAPI(options);
}

const question = (text) => [{ role: RoleType.User, content: text, content_type: 'text' }];

// What a failed SDK call says: the SDK's APIError carries Coze's code and the HTTP status.
function failure(e) {
  return { name: e?.constructor?.name, code: e?.code ?? null, status: e?.status ?? null, message: String(e?.message ?? e) };
}

const scenarios = {
  // chat.stream: every event with its arrival time (ms, monotonic), so the test sees deltas spread over time.
  async stream(p) {
    const coze = client(p.user, p);
    const events = [];
    let reply = '';
    const t0 = performance.now();
    const stream = await coze.chat.stream({
      bot_id: p.botId, user_id: p.user, conversation_id: p.conversationId, additional_messages: question(p.text),
    });
    for await (const part of stream) {
      const ev = { event: part.event, t: performance.now() - t0 };
      if (part.event === ChatEventType.CONVERSATION_MESSAGE_DELTA) {
        ev.content = part.data.content;
        reply += part.data.content;
      } else if (part.event === ChatEventType.CONVERSATION_CHAT_COMPLETED) {
        ev.usage = part.data.usage;
        ev.conversation_id = part.data.conversation_id;
      }
      events.push(ev);
    }
    return { reply, events };
  },

  // conversations.create, chat.createAndPoll (chat.create + chat.retrieve + chat.messages.list),
  // conversations.messages.list, files.upload (multipart).
  async calls(p) {
    const coze = client(p.user, p);
    const conversation = await coze.conversations.create({ bot_id: p.botId });
    const created = await coze.chat.create({
      bot_id: p.botId, user_id: p.user, conversation_id: conversation.id, additional_messages: question(p.text),
    });
    const polled = await coze.chat.createAndPoll({
      bot_id: p.botId, user_id: p.user, conversation_id: conversation.id, additional_messages: question(`${p.text} again`),
    });
    const listed = await coze.conversations.messages.list(conversation.id, { limit: 20 });
    const dir = mkdtempSync(join(tmpdir(), 'coze-sdk-'));
    const path = join(dir, p.fileName);
    writeFileSync(path, p.fileText);
    const file = await coze.files.upload({ file: createReadStream(path) });
    return {
      conversation,
      created: { id: created.id, conversation_id: created.conversation_id, status: created.status },
      polled: { status: polled.chat.status, usage: polled.chat.usage, messages: polled.messages.map((m) => m.content) },
      listed: listed.data.map((m) => ({ role: m.role, content: m.content })),
      file,
    };
  },

  // conversations.messages.list on a conversation id: the list, or how the SDK reported the refusal.
  async list(p) {
    const coze = client(p.user, p);
    try {
      const listed = await coze.conversations.messages.list(p.conversationId);
      return { ok: true, messages: listed.data.map((m) => m.content) };
    } catch (e) {
      return { ok: false, error: failure(e) };
    }
  },

  // Coze's WebSocket chat through the SDK's own client (client.websockets.chat.create): chat.update, one
  // user message, every server event until conversation.chat.completed (or an error / timeout).
  async ws(p) {
    const coze = client(p.user, p);
    // The SDK hands `ws` only the headers; routing a Node WebSocket through a proxy takes a WebSocket
    // class with an agent (none without p.proxy) (reconnecting-websocket uses the `WebSocket` option the SDK passes on).
    const { default: WS } = await import('ws');
    const { HttpsProxyAgent } = await import('https-proxy-agent');
    const agent = p.proxy ? new HttpsProxyAgent(p.proxy) : undefined;
    let headers = {};
    class ProxiedWebSocket extends WS {
      constructor(url, protocols) {
        super(url, protocols, { headers, agent });
      }
    }
    const opts = { WebSocket: ProxiedWebSocket, maxRetries: 0 };
    // the same headers the SDK gives its own ws class (Authorization: Bearer user:<id>, User-Agent...)
    headers = (await coze.buildWebsocketOptions({})).headers;
    if (p.origin) headers = { ...headers, Origin: p.origin }; // as a browser would send it
    const ws = await coze.websockets.chat.create({ bot_id: p.botId }, opts);
    const events = [];
    const t0 = performance.now();
    const outcome = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve('timeout'), p.timeoutMs ?? 10000);
      const done = (why) => { clearTimeout(timer); resolve(why); };
      ws.onopen = () => {
        ws.send({ id: 'upd-1', event_type: 'chat.update', data: { chat_config: { user_id: p.user, auto_save_history: true } } });
        ws.send({ id: 'msg-1', event_type: 'conversation.message.create',
                  data: { role: 'user', content_type: 'text', content: p.text } });
      };
      ws.onmessage = (data) => {
        events.push({ event: data.event_type, t: performance.now() - t0, content: data.data?.content });
        if (data.event_type === 'conversation.chat.completed') done('completed');
        if (data.event_type === 'error') done('error');
      };
      ws.onerror = (err) => { events.push({ event: 'client_error', t: performance.now() - t0, error: err?.data }); done('error'); };
    });
    ws.close();
    const reply = events.filter((e) => e.event === 'conversation.message.delta').map((e) => e.content).join('');
    return { outcome, reply, events };
  },
};

const [scenario, raw] = process.argv.slice(2);
if (!scenarios[scenario]) {
  console.log(JSON.stringify({ error: { message: `unknown scenario ${scenario}; one of ${Object.keys(scenarios)}` } }));
  process.exit(2);
}
try {
  const result = await scenarios[scenario](JSON.parse(raw ?? '{}'));
  console.log(JSON.stringify({ result }));
  process.exit(0);
} catch (e) {
  console.log(JSON.stringify({ error: failure(e), stack: e?.stack }));
  process.exit(1);
}
