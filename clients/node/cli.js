// What the Node.js command-line scripts (search.js, caption.js) share: the connection options, the usage
// error (exit 2), the exit code of a failed call (2 for INVALID_ARGUMENT/NOT_FOUND, 1 otherwise).
"use strict";

const fs = require("fs");
const { connect } = require("./client");

const CONNECTION_USAGE = "[--target HOST:PORT] [--token-file FILE] [--tls-ca FILE] [--timeout SECONDS]";

// args from argv: connection options here, the script's own through `own(option, next)`, which returns how
// many arguments after the option it took (0 or 1; `next` is undefined at the end) and throws for an
// unknown option; everything else is a positional argument.
function parseArgs(argv, own) {
  const args = { target: "127.0.0.1:50051", timeout: 60, positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--target" || a === "--server") args.target = value();
    else if (a === "--token-file") args.token = fs.readFileSync(value(), "utf8").trim();
    else if (a === "--tls-ca") args.tlsCa = value();
    else if (a === "--timeout") args.timeout = Number(value());
    else if (a.startsWith("-") && a !== "-") i += own(a, argv[i + 1]);
    else args.positional.push(a);
  }
  if (!(args.timeout > 0)) throw new Error("--timeout must be a positive number of seconds");
  args.token = args.token || process.env.COCA_SEARCH_TOKEN || undefined;
  return args;
}

// Run `body(client, args)` as a script named `name`: bad arguments print the usage and exit 2; a failed
// call prints one line.
async function runScript(name, usage, parse, body) {
  const argv = process.argv.slice(2);
  if (argv.includes("-h") || argv.includes("--help")) {
    console.log(usage);
    return 0;
  }
  let args;
  try {
    args = parse(argv);
  } catch (e) {
    console.error(`${name}: ${e.message}\n${usage}`);
    return 2;
  }
  const client = connect(args.target, { token: args.token, tlsCa: args.tlsCa, timeoutMs: args.timeout * 1000 });
  try {
    await body(client, args);
    return 0;
  } catch (e) {
    console.error(`${name}: error: ${e.message}`);
    return e.code === "INVALID_ARGUMENT" || e.code === "NOT_FOUND" ? 2 : 1;
  } finally {
    client.close();
  }
}

// The value after an option that needs one.
function needValue(option, next) {
  if (next === undefined) throw new Error(`${option} needs a value`);
  return next;
}

module.exports = { CONNECTION_USAGE, needValue, parseArgs, runScript };
