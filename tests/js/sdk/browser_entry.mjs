// Entry of the browser bundle of the official Coze JS SDK that tests/test_sdk_browser.py builds with esbuild
// (as a web app's bundler would) and loads in a page: window.CozeSDK.CozeAPI etc.
export { CozeAPI, ChatEventType, RoleType } from '@coze/api';
