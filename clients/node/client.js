// A Node.js client of the coca search service (coca.search.v1).
//
// It loads search_service/proto/coca/search/v1/search.proto at run time with @grpc/proto-loader: no
// generated code, so it shows that the .proto alone is enough to talk to the service.
//
//   const { connect } = require("./client");
//   const client = connect("127.0.0.1:50051", { token, tlsCa });
//   const { hits } = await client.searchText("a cat", { k: 5, withCaptions: true });
//   for await (const chunk of client.captionStream(fs.readFileSync("cat.jpg"))) process.stdout.write(chunk.piece);
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "search_service", "proto");
const PROTO_FILE = "coca/search/v1/search.proto";

function loadService(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot],
    keepCase: true, // field names as in the .proto (with_captions, caption_error)
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).coca.search.v1.SearchService;
}

class SearchError extends Error {
  constructor(method, target, error) {
    const code = grpc.status[error.code] || String(error.code);
    super(`${method} on ${target}: ${code}: ${error.details || error.message}`);
    this.name = "SearchError";
    this.code = code;
    this.details = error.details;
  }
}

// Calls retried on UNAVAILABLE only, with exponential backoff and jitter, inside one deadline.
function connect(target, { token, tlsCa, timeoutMs = 60000, attempts = 5, protoRoot } = {}) {
  const SearchService = loadService(protoRoot);
  const credentials = tlsCa ? grpc.credentials.createSsl(fs.readFileSync(tlsCa)) : grpc.credentials.createInsecure();
  const stub = new SearchService(target, credentials, {
    "grpc.max_receive_message_length": 64 << 20,
    "grpc.max_send_message_length": 64 << 20,
  });
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);

  function unary(method, request, { timeout = timeoutMs } = {}) {
    const end = Date.now() + timeout;
    return new Promise((resolve, reject) => {
      let attempt = 0;
      let backoff = 100;
      const tryOnce = () => {
        attempt += 1;
        stub[method](request, metadata, { deadline: new Date(end) }, (error, response) => {
          if (!error) return resolve(response);
          const wait = Math.min(5000, backoff) * (0.5 + Math.random() / 2);
          backoff *= 2;
          if (error.code === grpc.status.UNAVAILABLE && attempt < attempts && Date.now() + wait < end) {
            setTimeout(tryOnce, wait);
          } else {
            reject(new SearchError(method, target, error));
          }
        });
      };
      tryOnce();
    });
  }

  // CaptionStream: an async iterator of chunks ({ piece, text, token_count, done, caption }); leaving the
  // loop early cancels the call (the service frees its decoder sequence). Not retried.
  async function* stream(method, request, { timeout = timeoutMs } = {}) {
    const call = stub[method](request, metadata, { deadline: new Date(Date.now() + timeout) });
    try {
      for await (const message of call) yield message;
    } catch (error) {
      throw new SearchError(method, target, error);
    } finally {
      call.cancel();
    }
  }

  // What to caption: image bytes (a Buffer), or { id } of an indexed item, or { video, frames }.
  const captionRequest = (media, sampling) => (Buffer.isBuffer(media) ? { image: media, sampling } : { ...media, sampling });

  const options = ({ k = 10, withCaptions = false, filters = {}, minScore } = {}) => {
    const o = { k, with_captions: withCaptions, filters };
    if (minScore !== undefined) o.min_score = minScore;
    return o;
  };

  return {
    searchText: (text, opts = {}) => unary("SearchText", { text, options: options(opts) }, opts),
    searchImage: (image, opts = {}) => unary("SearchImage", { image, options: options(opts) }, opts),
    caption: (media, sampling = {}, opts = {}) => unary("Caption", captionRequest(media, sampling), opts),
    captionStream: (media, sampling = {}, opts = {}) => stream("CaptionStream", captionRequest(media, sampling), opts),
    get: (id, opts = {}) => unary("Get", { id }, opts),
    stats: (opts = {}) => unary("Stats", {}, opts),
    close: () => stub.close(),
  };
}

module.exports = { connect, loadService, SearchError, PROTO_ROOT, PROTO_FILE };
