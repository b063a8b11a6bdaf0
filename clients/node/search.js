#!/usr/bin/env node
// Text search from Node.js:
//   node clients/node/search.js --target 127.0.0.1:50051 "a cat on a sofa" -k 5 [--captions] [--json]
//                               [--token-file FILE | $COCA_SEARCH_TOKEN] [--tls-ca ca.pem] [--timeout SECONDS]
// Exit codes: 0 hits printed, 2 bad arguments or INVALID_ARGUMENT/NOT_FOUND, 1 other errors.
"use strict";

const { CONNECTION_USAGE, needValue, parseArgs, runScript } = require("./cli");

const USAGE = `usage: node search.js "query" [-k N] [--captions] [--json] ${CONNECTION_USAGE}`;

function parse(argv) {
  const own = { k: 10, captions: false, json: false };
  const args = parseArgs(argv, (option, next) => {
    if (option === "--captions" || option === "--json") {
      own[option.slice(2)] = true;
      return 0;
    }
    if (option !== "-k" && option !== "--k") throw new Error(`unknown option ${option}`);
    own.k = Number(needValue(option, next));
    return 1;
  });
  Object.assign(args, own);
  if (args.positional.length === 0) throw new Error("give the text to search for");
  if (args.positional.length > 1) {
    throw new Error(`one query only (got ${args.positional.map((q) => JSON.stringify(q)).join(" and ")})`);
  }
  args.query = args.positional[0];
  if (!Number.isInteger(args.k)) throw new Error("-k must be an integer");
  return args;
}

runScript("search.js", USAGE, parse, async (client, args) => {
  const response = await client.searchText(args.query, { k: args.k, withCaptions: args.captions });
  if (args.json) {
    console.log(JSON.stringify({ query: args.query, searched: response.searched, hits: response.hits }));
    return;
  }
  console.log(`${response.hits.length} hits for ${JSON.stringify(args.query)} (${response.searched} images searched)`);
  console.log(`${"#".padStart(3)}  ${"score".padStart(6)}  ${"id".padEnd(32)}  uri / caption`);
  response.hits.forEach((hit, i) => {
    console.log(`${String(i + 1).padStart(3)}  ${hit.score.toFixed(3).padStart(6)}  ${hit.id.padEnd(32)}  ${hit.uri}`);
    const caption = hit.caption || (hit.caption_error ? `(no caption: ${hit.caption_error})` : "");
    if (caption) console.log(`${" ".repeat(46)}${caption}`);
  });
}).then((code) => process.exit(code));
