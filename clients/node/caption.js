#!/usr/bin/env node
// A caption from Node.js, printed as the decoder writes it (CaptionStream):
//   node clients/node/caption.js --target 127.0.0.1:50051 photo.jpg [--id ID] [--max-tokens N] [--json]
//                                [--token-file FILE | $COCA_SEARCH_TOKEN] [--tls-ca ca.pem] [--timeout SECONDS]
// Prints the pieces as they come, then a newline; --json prints each chunk as one JSON line instead.
// Exit codes: 0 captioned, 2 bad arguments or INVALID_ARGUMENT/NOT_FOUND, 1 other errors.
"use strict";

const fs = require("fs");
const { CONNECTION_USAGE, needValue, parseArgs, runScript } = require("./cli");

const USAGE = `usage: node caption.js (IMAGE | --id ID) [--max-tokens N] [--json] ${CONNECTION_USAGE}`;

function parse(argv) {
  const own = { json: false, id: null, sampling: {} };
  const args = parseArgs(argv, (option, next) => {
    if (option === "--json") {
      own.json = true;
      return 0;
    }
    if (option === "--id") own.id = needValue(option, next);
    else if (option === "--max-tokens") own.sampling.max_tokens = Number(needValue(option, next));
    else throw new Error(`unknown option ${option}`);
    return 1;
  });
  Object.assign(args, own);
  if (args.positional.length > 1) throw new Error(`one image only (got ${args.positional.join(", ")})`);
  args.image = args.positional[0] ?? null;
  if ((args.image === null) === (args.id === null)) throw new Error("give an image file or --id ID");
  if ("max_tokens" in args.sampling && !Number.isInteger(args.sampling.max_tokens)) {
    throw new Error("--max-tokens must be an integer");
  }
  return args;
}

runScript("caption.js", USAGE, parse, async (client, args) => {
  const media = args.id !== null ? { id: args.id } : fs.readFileSync(args.image);
  for await (const chunk of client.captionStream(media, args.sampling)) {
    if (args.json) console.log(JSON.stringify(chunk));
    else process.stdout.write(chunk.piece);
  }
  if (!args.json) process.stdout.write("\n");
}).then((code) => process.exit(code));
