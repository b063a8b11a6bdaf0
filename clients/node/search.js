#!/usr/bin/env node
// Text search from Node.js:
//   node clients/node/search.js --target 127.0.0.1:50051 "a cat on a sofa" -k 5 [--captions] [--json]
//                               [--mode vector|keyword|hybrid] [--keyword-weight W] [--filter KEY=VALUE ...]
//                               [--where CONDITION ...] [--order-by [-]FIELD] [--page-token TOKEN]
//                               [--token-file FILE | $COCA_SEARCH_TOKEN] [--tls-ca ca.pem] [--timeout SECONDS]
// CONDITION as in `coca search --where`: FIELD=V, FIELD!=V, FIELD=A|B (any of), FIELD>=V, FIELD>V, FIELD<=V, FIELD<V.
// Exit codes: 0 hits printed, 2 bad arguments or INVALID_ARGUMENT/NOT_FOUND, 1 other errors.
"use strict";

const fs = require("fs");
const { connect } = require("./client");

const USAGE = 'usage: node search.js [--target HOST:PORT] "query" [-k N] [--captions] [--json] ' +
  "[--mode vector|keyword|hybrid] [--keyword-weight W] [--filter KEY=VALUE] [--where CONDITION] " +
  "[--order-by [-]FIELD] [--page-token TOKEN] [--token-file FILE] [--tls-ca FILE] [--timeout SECONDS]";
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

function parseArgs(argv) {
  const args = { target: "127.0.0.1:50051", k: 10, captions: false, json: false, timeout: 60, query: null,
                 mode: "vector", filters: {}, where: [], orderBy: "", pageToken: "" };
  const value = (i, name) => {
    if (i + 1 >= argv.length) throw new Error(`${name} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--target" || a === "--server") args.target = value(i++, a);
    else if (a === "-k" || a === "--k") args.k = Number(value(i++, a));
    else if (a === "--captions") args.captions = true;
    else if (a === "--mode") args.mode = value(i++, a);
    else if (a === "--keyword-weight") args.keywordWeight = Number(value(i++, a));
    else if (a === "--where") args.where.push(parseCondition(value(i++, a)));
    else if (a === "--order-by") args.orderBy = value(i++, a);
    else if (a === "--page-token") args.pageToken = value(i++, a);
    else if (a === "--filter") {
      const [key, ...rest] = value(i, a).split("=");
      if (!key || !rest.length) throw new Error(`--filter ${JSON.stringify(value(i, a))}: write it as key=value`);
      args.filters[key] = rest.join("=");
      i++;
    }
    else if (a === "--json") args.json = true;
    else if (a === "--token-file") args.token = fs.readFileSync(value(i++, a), "utf8").trim();
    else if (a === "--tls-ca") args.tlsCa = value(i++, a);
    else if (a === "--timeout") args.timeout = Number(value(i++, a));
    else if (a === "-h" || a === "--help") { console.log(USAGE); process.exit(0); }
    else if (a.startsWith("-") && a !== "-") throw new Error(`unknown option ${a}`);
    else if (args.query === null) args.query = a;
    else throw new Error(`one query only (got ${JSON.stringify(args.query)} and ${JSON.stringify(a)})`);
  }
  if (args.query === null) throw new Error("give the text to search for");
  if (!Number.isInteger(args.k)) throw new Error("-k must be an integer");
  if (!(args.timeout > 0)) throw new Error("--timeout must be a positive number of seconds");
  if (!["vector", "keyword", "hybrid"].includes(args.mode)) throw new Error("--mode must be vector, keyword or hybrid");
  if (args.keywordWeight !== undefined && !Number.isFinite(args.keywordWeight)) throw new Error("--keyword-weight must be a number");
  args.token = args.token || process.env.COCA_SEARCH_TOKEN || undefined;
  return args;
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`search.js: ${e.message}\n${USAGE}`);
    return 2;
  }
  const client = connect(args.target, { token: args.token, tlsCa: args.tlsCa, timeoutMs: args.timeout * 1000 });
  try {
    const response = await client.searchText(args.query, {
      k: args.k, withCaptions: args.captions, mode: args.mode, keywordWeight: args.keywordWeight, filters: args.filters,
      where: args.where, orderBy: args.orderBy, pageToken: args.pageToken });
    if (args.json) {
      console.log(JSON.stringify({ query: args.query, searched: response.searched, hits: response.hits,
                                   next_page_token: response.next_page_token }));
      return 0;
    }
    console.log(`${response.hits.length} hits for ${JSON.stringify(args.query)} (${response.searched} images searched)`);
    console.log(`${"#".padStart(3)}  ${"score".padStart(6)}  ${"id".padEnd(32)}  uri / caption`);
    response.hits.forEach((hit, i) => {
      console.log(`${String(i + 1).padStart(3)}  ${hit.score.toFixed(3).padStart(6)}  ${hit.id.padEnd(32)}  ${hit.uri}`);
      const caption = hit.caption || (hit.caption_error ? `(no caption: ${hit.caption_error})` : "");
      if (caption) console.log(`${" ".repeat(46)}${caption}`);
    });
    if (response.next_page_token) console.log(`next page: --page-token ${response.next_page_token}`);
    return 0;
  } catch (e) {
    console.error(`search.js: error: ${e.message}`);
    return e.code === "INVALID_ARGUMENT" || e.code === "NOT_FOUND" ? 2 : 1;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
