// A Node.js client of the coca search service (coca.search.v1).
//
// It loads search_service/proto/coca/search/v1/search.proto at run time with @grpc/proto-loader: no
// generated code, so it shows that the .proto alone is enough to talk to the service.
//
//   const { connect } = require("./client");
//   const client = connect("127.0.0.1:50051", { token, tlsCa });
//   const { hits } = await client.searchText("a cat", { k: 5, withCaptions: true });
//   const page = await client.searchText("a red barn", { mode: "hybrid", where: [{ field: "year", gte: "2000" }],
//                                                         pageToken: previous.next_page_token });
//   for await (const item of client.iterItems({ orderBy: "-added_at", pageSize: 50 })) console.log(item.id);
//   const { groups } = await client.findDuplicates({ threshold: 0.95 });
//   const results = await client.add([{ image: fs.readFileSync("a.jpg"), nearDuplicateThreshold: 0.95 }]);
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
  constructor(method, target, error, attempts = 1) {
    const code = grpc.status[error.code] || String(error.code);
    super(`${method} on ${target}: ${code}: ${error.details || error.message}` + (attempts > 1 ? ` (after ${attempts} attempts)` : ""));
    this.name = "SearchError";
    this.code = code;
    this.details = error.details;
    this.attempts = attempts;
    this.retryAfterMs = retryAfterMs(error);
  }
}

// The service's hint on a call it shed (search_service/admission.py): trailing metadata retry-after-ms.
// null without one: then RESOURCE_EXHAUSTED is final (a message over the size limit cannot be asked again).
function retryAfterMs(error) {
  if (error.code !== grpc.status.RESOURCE_EXHAUSTED || !error.metadata) return null;
  const [value] = error.metadata.get("retry-after-ms");
  const ms = value === undefined ? NaN : Number(String(value));
  return Number.isFinite(ms) && ms >= 0 ? ms : null;
}

// Calls retried on UNAVAILABLE, and on a shed call after at least the server's hint (jittered upwards, so
// the shed callers do not all come back at once), with exponential backoff and jitter, inside one deadline.
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
          const hint = retryAfterMs(error);
          const wait = Math.max(Math.min(5000, backoff) * (0.5 + Math.random() / 2), (hint || 0) * (1 + Math.random() / 2));
          backoff *= 2;
          const retryable = error.code === grpc.status.UNAVAILABLE || hint !== null;
          if (retryable && attempt < attempts && Date.now() + wait < end) {
            setTimeout(tryOnce, wait);
          } else {
            reject(new SearchError(method, target, error, attempt));
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

  return {
    // opts: k, withCaptions, filters, minScore, where, orderBy, pageToken (searchOptions below); mode
    // ("vector", "keyword" or "hybrid") and keywordWeight (hybrid: 0..1)
    searchText: (text, opts = {}) => unary("SearchText", searchTextRequest(text, opts), opts),
    searchImage: (image, opts = {}) => unary("SearchImage", { image, options: searchOptions(opts) }, opts),
    caption: (media, sampling = {}, opts = {}) => unary("Caption", captionRequest(media, sampling), opts),
    captionStream: (media, sampling = {}, opts = {}) => stream("CaptionStream", captionRequest(media, sampling), opts),
    get: (id, opts = {}) => unary("Get", { id }, opts),
    stats: (opts = {}) => unary("Stats", {}, opts),
    // One page of items: { filters, where, orderBy, pageSize, pageToken, includeEmbeddings } -> { items, next_page_token, total }
    list: (opts = {}) => unary("List", listRequest(opts), opts),
    // Every item passing the conditions, a page at a time (list's options).
    iterItems: async function* (opts = {}) {
      let pageToken = opts.pageToken || "";
      do {
        const page = await unary("List", listRequest({ ...opts, pageToken }), opts);
        yield* page.items;
        pageToken = page.next_page_token;
      } while (pageToken);
    },
    // Groups of near-identical images: { threshold, pageSize, pageToken, neighbors } -> { groups, next_page_token, total_groups }
    findDuplicates: ({ threshold = 0.95, pageSize = 50, pageToken = "", neighbors = 10, ...opts } = {}) =>
      unary("FindDuplicates", { threshold, page_size: pageSize, page_token: pageToken, neighbors }, opts),
    // Index images: items [{ image (Buffer) | path, id, metadata, uri, nearDuplicateThreshold,
    // skipNearDuplicates, caption }] -> one result per item, in order (no retries: adding again is idempotent).
    add: (items, opts = {}) => streamAll(stub, metadata, target, "AddImages", items.map(addRequest), opts.timeout || timeoutMs),
    // Index videos as scenes: [{ video (Buffer) | path, id, metadata, uri, options: { everyS, sceneThreshold,
    // minSceneS, maxSceneS, caption } }] -> one result per video ({ outcome, id, video: { scenes } }), in order.
    // Not retried (adding again answers DUPLICATE without decoding).
    addVideos: (videos, opts = {}) =>
      streamAll(stub, metadata, target, "AddVideos", videos.map(addVideoRequest), opts.timeout || timeoutMs),
    // Bytes of a stored video by id: { data, offset, total_bytes, content_type }, at most 4 MiB a call.
    readVideo: (id, offset = 0, length = 4 << 20, opts = {}) => unary("ReadVideo", { id, offset, length }, opts),
    close: () => stub.close(),
  };
}

const MODES = { vector: "VECTOR", keyword: "KEYWORD", hybrid: "HYBRID" };
const BOUNDS = ["gte", "gt", "lte", "lt"];

// A condition { field, equals | anyOf | gte/gt/lte/lt, negate } as the proto's Condition (one test exactly).
function conditionMessage({ field, equals, anyOf, negate = false, ...rest }) {
  const bounds = Object.fromEntries(BOUNDS.filter((b) => rest[b] !== undefined).map((b) => [b, String(rest[b])]));
  const given = [equals !== undefined, anyOf !== undefined, Object.keys(bounds).length > 0].filter(Boolean).length;
  if (given !== 1) throw new Error(`condition on ${JSON.stringify(field)}: give one of equals, anyOf or range bounds`);
  const condition = { field, negate };
  if (equals !== undefined) condition.equals = String(equals);
  else if (anyOf !== undefined) condition.any_of = { values: anyOf.map(String) };
  else condition.range = bounds;
  return condition;
}

// "added_at" ascending, "-added_at" descending; "" or undefined: none.
const orderMessage = (orderBy = "") => ({ field: orderBy.replace(/^-/, ""), descending: orderBy.startsWith("-") });

// groupByVideo: each video's best scene only. Scene hits carry video_id, start_s, end_s (README "Video").
function searchOptions({ k = 10, withCaptions = false, filters = {}, minScore, where = [], orderBy, pageToken = "",
                         groupByVideo = false } = {}) {
  const o = { k, with_captions: withCaptions, filters, where: where.map(conditionMessage), order_by: orderMessage(orderBy),
              page_token: pageToken, group_by_video: groupByVideo };
  if (minScore !== undefined) o.min_score = minScore;
  return o;
}

function searchTextRequest(text, { mode = "vector", keywordWeight, ...opts } = {}) {
  if (!(mode in MODES)) throw new Error(`mode must be one of ${Object.keys(MODES).join(", ")}, got ${JSON.stringify(mode)}`);
  const request = { text, options: searchOptions(opts), mode: MODES[mode] };
  if (keywordWeight !== undefined) request.keyword_weight = keywordWeight;
  return request;
}

function listRequest({ filters = {}, where = [], orderBy, pageSize = 100, pageToken = "", includeEmbeddings = false } = {}) {
  return { filters, where: where.map(conditionMessage), order_by: orderMessage(orderBy), page_size: pageSize,
           page_token: pageToken, include_embeddings: includeEmbeddings };
}

function addRequest({ image, path: serverPath, id = "", metadata = {}, uri = "", nearDuplicateThreshold,
                      skipNearDuplicates = false, caption = false }) {
  const options = { skip_near_duplicates: skipNearDuplicates, caption };
  if (nearDuplicateThreshold !== undefined) options.near_duplicate_threshold = nearDuplicateThreshold;
  const request = { id, metadata, uri, options };
  if (serverPath !== undefined) request.path = serverPath;
  else request.image = image;
  return request;
}

const VIDEO_OPTIONS = { everyS: "every_s", sceneThreshold: "scene_threshold", minSceneS: "min_scene_s",
                        maxSceneS: "max_scene_s", caption: "caption" };

function addVideoRequest({ video, path: serverPath, id = "", metadata = {}, uri = "", options = {} }) {
  const unknown = Object.keys(options).filter((name) => !(name in VIDEO_OPTIONS));
  if (unknown.length) throw new Error(`unknown video option ${unknown[0]}: give ${Object.keys(VIDEO_OPTIONS).join(", ")}`);
  const request = { id, metadata, uri, options: Object.fromEntries(Object.entries(options).map(([k, v]) => [VIDEO_OPTIONS[k], v])) };
  if (serverPath !== undefined) request.path = serverPath;
  else request.video = video;
  return request;
}

// A client-streaming call of `requests` (built before anything is sent: a bad one throws first); its results.
function streamAll(stub, metadata, target, method, requests, timeout) {
  return new Promise((resolve, reject) => {
    const results = [];
    const call = stub[method](metadata, { deadline: new Date(Date.now() + timeout) });
    call.on("data", (result) => results.push(result));
    call.on("error", (error) => reject(new SearchError(method, target, error)));
    call.on("end", () => resolve(results));
    requests.forEach((request) => call.write(request));
    call.end();
  });
}

module.exports = { connect, loadService, conditionMessage, SearchError, PROTO_ROOT, PROTO_FILE };
