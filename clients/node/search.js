#!/usr/bin/env node
// Text search from Node.js:
//   node clients/node/search.js --target 127.0.0.1:50051 "a cat on a sofa" -k 5 [--captions] [--json]
//                               [--mode vector|keyword|hybrid] [--keyword-weight W] [--filter KEY=VALUE ...]
//                               [--where CONDITION ...] [--order-by [-]FIELD] [--page-token TOKEN]
//                               [--token-file FILE | $COCA_SEARCH_TOKEN] [--tls-ca ca.pem] [--timeout SECONDS]
// CONDITION as in `coca search --where`: FIELD=V, FIELD!=V, FIELD=A|B (any of), FIELD>=V, FIELD>V, FIELD<=V, FIELD<V.
// Exit codes: 0 hits printed, 2 bad arguments or INVALID_ARGUMENT/NOT_FOUND, 1 other errors.
"use strict";

const { CONNECTION_USAGE, needValue, parseArgs, runScript } = require("./cli");

const USAGE = 'usage: node search.js "query" [-k N] [--captions] [--json] [--mode vector|keyword|hybrid] ' +
  "[--keyword-weight W] [--filter KEY=VALUE] [--where CONDITION] [--order-by [-]FIELD] [--page-token TOKEN] " +
  CONNECTION_USAGE;
const MODES = ["vector", "keyword", "hybrid"];
const OPERATORS = ["!=", ">=", "<=", "=", ">", "<"]; // longest first
const BOUNDS = { ">=": "gte", ">": "gt", "<=": "lte", "<": "lt" };

// A --where condition as a client condition (see `coca search --where`).
function parseCondition(text) {
  const found = OPERATORS.map((op) => [text.indexOf(op), op]).filter(([at]) => at > 0)
    .sort((a, b) => a[0] - b[0] || b[1].length - a[1].length)[0];
  if (!found) throw new Error(`--where ${JSON.stringify(text)}: write FIELD=V, FIELD!=V, FIELD=A|B, FIELD>=V, FIELD>V, FIELD<=V or FIELD<V`);
  const [at, op] = found;
  const field = text.slice(0, at);
  const value = text.slice(at + op.length);
  if (op in BOUNDS) return { field, [BOUNDS[op]]: value };
  const values = value.split("|");
  return values.length > 1 ? { field, anyOf: values, negate: op === "!=" } : { field, equals: value, negate: op === "!=" };
}

function parseFilter(text) {
  const at = text.indexOf("=");
  if (at <= 0) throw new Error(`--filter ${JSON.stringify(text)}: write it as key=value`);
  return [text.slice(0, at), text.slice(at + 1)];
}

function parse(argv) {
  const own = { k: 10, captions: false, json: false, mode: "vector", filters: {}, where: [], orderBy: "", pageToken: "" };
  const withValue = {
    "-k": (v) => { own.k = Number(v); },
    "--k": (v) => { own.k = Number(v); },
    "--mode": (v) => { own.mode = v; },
    "--keyword-weight": (v) => { own.keywordWeight = Number(v); },
    "--filter": (v) => { const [key, value] = parseFilter(v); own.filters[key] = value; },
    "--where": (v) => { own.where.push(parseCondition(v)); },
    "--order-by": (v) => { own.orderBy = v; },
    "--page-token": (v) => { own.pageToken = v; },
  };
  const args = parseArgs(argv, (option, next) => {
    if (option === "--captions" || option === "--json") {
      own[option.slice(2)] = true;
      return 0;
    }
    if (!(option in withValue)) throw new Error(`unknown option ${option}`);
    withValue[option](needValue(option, next));
    return 1;
  });
  Object.assign(args, own);
  if (args.positional.length === 0) throw new Error("give the text to search for");
  if (args.positional.length > 1) {
    throw new Error(`one query only (got ${args.positional.map((q) => JSON.stringify(q)).join(" and ")})`);
  }
  args.query = args.positional[0];
  if (!Number.isInteger(args.k)) throw new Error("-k must be an integer");
  if (!MODES.includes(args.mode)) throw new Error("--mode must be vector, keyword or hybrid");
  if (args.keywordWeight !== undefined && !Number.isFinite(args.keywordWeight)) throw new Error("--keyword-weight must be a number");
  return args;
}

runScript("search.js", USAGE, parse, async (client, args) => {
  const response = await client.searchText(args.query, {
    k: args.k, withCaptions: args.captions, mode: args.mode, keywordWeight: args.keywordWeight, filters: args.filters,
    where: args.where, orderBy: args.orderBy, pageToken: args.pageToken });
  if (args.json) {
    console.log(JSON.stringify({ query: args.query, searched: response.searched, hits: response.hits,
                                 next_page_token: response.next_page_token }));
    return;
  }
  console.log(`${response.hits.length} hits for ${JSON.stringify(args.query)} (${response.searched} images searched)`);
  console.log(`${"#".padStart(3)}  ${"score".padStart(6)}  ${"id".padEnd(32)}  uri / caption`);
  response.hits.forEach((hit, i) => {
    console.log(`${String(i + 1).padStart(3)}  ${hit.score.toFixed(3).padStart(6)}  ${hit.id.padEnd(32)}  ${hit.uri}`);
    const caption = hit.caption || (hit.caption_error ? `(no caption: ${hit.caption_error})` : "");
    if (caption) console.log(`${" ".repeat(46)}${caption}`);
  });
  if (response.next_page_token) console.log(`next page: --page-token ${response.next_page_token}`);
}).then((code) => process.exit(code));
