#!/usr/bin/env node
// A caption from Node.js, printed as the decoder writes it (CaptionStream):
//   node clients/node/caption.js --target 127.0.0.1:50051 photo.jpg [--id ID] [--max-tokens N] [--json]
//                                [--token-file FILE | $COCA_SEARCH_TOKEN] [--tls-ca ca.pem] [--timeout SECONDS]
// Prints the pieces as they come, then a newline; --json prints each chunk as one JSON line instead.
// Exit codes: 0 captioned, 2 bad arguments or INVALID_ARGUMENT/NOT_FOUND, 1 other errors.
"use strict";

const fs = require("fs");
const { connect } = require("./client");

const USAGE = "usage: node caption.js [--target HOST:PORT] (IMAGE | --id ID) [--max-tokens N] [--json] " +
  "[--token-file FILE] [--tls-ca FILE] [--timeout SECONDS]";

function parseArgs(argv) {
  const args = { target: "127.0.0.1:50051", json: false, timeout: 60, image: null, id: null, sampling: {} };
  const value = (i, name) => {
    if (i + 1 >= argv.length) throw new Error(`${name} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--target" || a === "--server") args.target = value(i++, a);
    else if (a === "--id") args.id = value(i++, a);
    else if (a === "--max-tokens") args.sampling.max_tokens = Number(value(i++, a));
    else if (a === "--json") args.json = true;
    else if (a === "--token-file") args.token = fs.readFileSync(value(i++, a), "utf8").trim();
    else if (a === "--tls-ca") args.tlsCa = value(i++, a);
    else if (a === "--timeout") args.timeout = Number(value(i++, a));
    else if (a === "-h" || a === "--help") { console.log(USAGE); process.exit(0); }
    else if (a.startsWith("-") && a !== "-") throw new Error(`unknown option ${a}`);
    else if (args.image === null) args.image = a;
    else throw new Error(`one image only (got ${JSON.stringify(args.image)} and ${JSON.stringify(a)})`);
  }
  if ((args.image === null) === (args.id === null)) throw new Error("give an image file or --id ID");
  if ("max_tokens" in args.sampling && !Number.isInteger(args.sampling.max_tokens)) {
    throw new Error("--max-tokens must be an integer");
  }
  if (!(args.timeout > 0)) throw new Error("--timeout must be a positive number of seconds");
  args.token = args.token || process.env.COCA_SEARCH_TOKEN || undefined;
  return args;
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`caption.js: ${e.message}\n${USAGE}`);
    return 2;
  }
  const client = connect(args.target, { token: args.token, tlsCa: args.tlsCa, timeoutMs: args.timeout * 1000 });
  try {
    const media = args.id !== null ? { id: args.id } : fs.readFileSync(args.image);
    for await (const chunk of client.captionStream(media, args.sampling)) {
      if (args.json) console.log(JSON.stringify(chunk));
      else process.stdout.write(chunk.piece);
    }
    if (!args.json) process.stdout.write("\n");
    return 0;
  } catch (e) {
    console.error(`caption.js: error: ${e.message}`);
    return e.code === "INVALID_ARGUMENT" || e.code === "NOT_FOUND" ? 2 : 1;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
