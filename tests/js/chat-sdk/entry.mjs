// A web page that mounts Coze's official chat component (@coze/chat-sdk, its Web build) with the coze-mitm
// placeholder token. tests/test_chat_sdk.py bundles it with esbuild (as a web app's bundler would: React,
// ReactDOM, the component's JS and its CSS) and serves it with an HTML page that has no inline script, so
// the page works under `Content-Security-Policy: default-src 'self'`.
//
// Everything comes from the page URL's query:
//   mode=bot|app  user=<id>  api=<Coze API base>  cdn=<cdnBaseUrlPath>
//   bot=<bot id> (bot mode)   app=<app id> workflow=<workflow id> conversation=<name> (app mode)
// What happened is kept in window.cozeChatLog for the test: onRefreshToken calls, init success, messages.
import '@coze/chat-sdk/webCss';
import ChatSdk from '@coze/chat-sdk/webJs';
import React from 'react';
import { createRoot } from 'react-dom/client';

// The Web build is a webpack UMD whose exports object has one key, `default` (the README's
// `import ChatSdk from '@coze/chat-sdk/webJs'` relies on webpack's interop); under esbuild the default
// import is that exports object itself.
const sdk = ChatSdk && ChatSdk.default && ChatSdk.default.ChatFramework ? ChatSdk.default : ChatSdk;
const { ChatFramework, ChatFlowFramework, ChatSlot, ChatType, Language } = sdk;
const h = React.createElement;

const q = new URLSearchParams(location.search);
const mode = q.get('mode') || 'bot';
const userId = q.get('user');
const token = `user:${userId}`; // the placeholder: coze-mitm swaps it for this user's own Coze token

const log = { refreshes: [], initSuccess: 0, finished: [], mode, userId };
window.cozeChatLog = log;

// What a page behind coze-mitm does when the component asks for a new token: hand it the same placeholder
// (the proxy holds the real token and renews it itself).
const refresh = (oldToken) => {
  log.refreshes.push(oldToken === undefined ? null : String(oldToken));
  return token;
};

const user = { id: userId, name: `User ${userId}`, avatar: `${location.origin}/avatar.png` };
const setting = {
  apiBaseUrl: q.get('api'),
  cdnBaseUrlPath: q.get('cdn') || `${location.origin}/cdn/`,
  language: Language.EN,
  requestHeader: {},
  logLevel: q.get('debug') ? 'debug' : 'release',
};
const messageCallbacks = {
  afterMessageReceivedFinish: (props) => { log.finished.push(props ? Object.keys(props) : null); },
};

let element;
if (mode === 'app') {
  element = h(ChatFlowFramework, {
    workflow: { id: q.get('workflow'), parameters: {} },
    project: {
      id: q.get('app'), type: 'app', mode: 'websdk', conversationName: q.get('conversation') || 'Default',
      name: 'coze-mitm app',
    },
    userInfo: user,
    setting,
    auth: { type: 'external', token, refreshToken: refresh },
    areaUi: { layout: 'pc', input: { isNeedAudio: false }, uploadBtn: { isNeed: true },
              clearContext: { isNeed: true }, clearMessage: { isNeed: true }, header: { isNeed: true, title: 'App' } },
    eventCallbacks: {
      onInitSuccess: () => { log.initSuccess += 1; },
      message: messageCallbacks,
    },
    style: { height: '100%' },
  }, h(ChatSlot, { className: 'chat-slot' }));
} else {
  element = h(ChatFramework, {
    chat: { appId: q.get('bot'), type: ChatType.Bot },
    setting,
    auth: { token, onRefreshToken: refresh },
    user,
    ui: {
      layout: 'pc',
      header: { isNeed: true, title: 'Bot' },
      chatSlot: { input: { isNeedAudio: false }, uploadBtn: { isNeed: true },
                  clearContext: { isNeed: true }, clearMessage: { isNeed: true } },
    },
    eventCallbacks: { message: messageCallbacks },
  }, h(ChatSlot, { className: 'chat-slot' }));
}

createRoot(document.getElementById('chat')).render(element);
window.cozeChatMounted = true;
