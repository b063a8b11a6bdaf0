#!/usr/bin/env node
// The Node.js client's answers to a list of calls, as JSON, for tests/test_clients.py to compare with the
// Python client's:  node answers.js TARGET '[{"call": "list", "args": [{"pageSize": 2}]}, ...]'
// Calls: any client method (its resolved value), "pages" (every page of list/searchText/findDuplicates, following
// next_page_token), "items" (iterItems, collected); add's items give `file` (its bytes are sent) for `image`,
// addVideos' for `video`; Buffers in answers come back as base64 strings.
"use strict";

const fs = require("fs");
const path = require("path");
const { connect } = require(path.resolve(__dirname, "..", "..", "clients", "node", "client.js"));

async function pages(client, method, args) {
  const out = [];
  let pageToken = "";
  do {
    const last = args.length - 1;
    const page = await client[method](...args.slice(0, last), { ...args[last], pageToken });
    out.push(page);
    pageToken = page.next_page_token;
  } while (pageToken);
  return out;
}

async function answer(client, { call, method, args = [] }) {
  if (call === "pages") return pages(client, method, args);
  if (call === "items") {
    const items = [];
    for await (const item of client.iterItems(...args)) items.push(item);
    return items;
  }
  const media = { add: "image", addVideos: "video" }[call];
  if (media) {
    return client[call](args[0].map(({ file, ...item }) => (file ? { ...item, [media]: fs.readFileSync(file) } : item)));
  }
  return client[call](...args);
}

async function main() {
  const [target, calls] = process.argv.slice(2);
  const client = connect(target, { timeoutMs: 120000 });
  try {
    const out = [];
    for (const call of JSON.parse(calls)) {
      try {
        out.push(await answer(client, call));
      } catch (e) {
        out.push({ error: e.message, code: e.code, attempts: e.attempts, retryAfterMs: e.retryAfterMs });
      }
    }
    console.log(JSON.stringify(out, (key, value) => (value && value.type === "Buffer" ? Buffer.from(value.data).toString("base64") : value)));
  } finally {
    client.close();
  }
}

main().catch((e) => { console.error(e.stack); process.exit(1); });
