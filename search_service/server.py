"""Run the search service: grpc.aio server, health checking, reflection, optional TLS and bearer token.

    python -m search_service.server --data DIR --triton 127.0.0.1:8001 [--port 50051] [--root DIR ...]
                                    [--index HNSW32] [--tls-cert F --tls-key F] [--token-file F]

Binds 127.0.0.1 unless --host says otherwise. Prints one line
"search service ready on HOST:PORT" once it serves; SIGTERM / Ctrl-C stop it
cleanly (in-flight calls get a grace period, then the index is snapshotted).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coca.media import VideoLimits

from .admission import Admission, Limits
from .caption_retry import RetryPolicy
from .collection import Collection, StoreUnavailable
from .config import DEFAULT_PORT, MIN_REINDEX_SHARE, VECTOR_STORES, ServiceConfig
from .engine import Engine
from .index import IndexSettings
from .interceptors import RecordMetrics, ShedLoad, with_behaviour
from .metrics import MetricsServer, ServiceMetrics
from .milvus import CONSISTENCY_LEVELS, MilvusCollection, MilvusSettings
from .query import FIELD_TYPES, Schema
from .store import StoreSetupError
from .models import Models
from .process import METRICS_NOTE, READY_LINE
from .pb import search_pb2, search_pb2_grpc
from .service import TRITON_CHECK_S, SearchServicer, status_of

log = logging.getLogger("search_service")

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
HEALTH_POLL_S = 2.0
# What a client may send on a stream ahead of what the service has read: HTTP/2 windows of 4 MiB, with gRPC's BDP
# probing off (it grows them without bound: 8 AddImages streams of 30 MiB images held ~800 MiB more in gRPC's
# buffers than what the intake budget admitted).
STREAM_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)]
HEALTH_CHECK_TTL_S = 1.0  # a health Check's answer is at most this old (plus one refresh)
OPEN_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")  # probes need no token


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Require "authorization: Bearer <token>" on every call except health checks. `tokens`: one token,
    or several, one per line (a token per client: the rate limit counts per token)."""

    def __init__(self, tokens: str):
        self._expected = [f"Bearer {token.strip()}".encode() for token in tokens.splitlines() if token.strip()]

    async def intercept_service(self, continuation, details):
        if details.method in OPEN_METHODS:
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        handler = await continuation(details)
        given = given.encode() if isinstance(given, str) else given
        if any([hmac.compare_digest(given, expected) for expected in self._expected]):  # a list: all compared
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')"

    async def refuse(request, context):  # a coroutine for every kind: grpc.aio and around_calls await it
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return None if handler is None else with_behaviour(handler, lambda behaviour, kind: refuse)


class ParseRequests(grpc.aio.ServerInterceptor):
    """Unary requests are parsed inside the call, so that bytes which do not parse (e.g. a non-UTF-8
    string) get INVALID_ARGUMENT saying so; grpc.aio's own answer is UNKNOWN. (An AddImages message
    that does not parse ends its stream the same way, after the items before it are acknowledged.)"""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming \
                or handler.request_deserializer is None:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary

        async def parsed(raw: bytes, context):
            try:
                request = parse(raw)
            except DecodeError as exc:
                await context.abort(*status_of(exc))
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(parsed, response_serializer=handler.response_serializer)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: Collection
    models: Models
    health: health.aio.HealthServicer
    _watch: asyncio.Task
    _retry: asyncio.Task  # the caption retry job
    metrics: Optional[MetricsServer] = None  # the /metrics endpoint, when --metrics-port is given

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        self._watch.cancel()
        self._retry.cancel()
        self.health.servicer.duplicate_scans.close()
        self.health.servicer.backups.close()
        await self.health.servicer.reindexing.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._retry
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics is not None:  # before the store closes: a scrape reads it
            await asyncio.to_thread(self.metrics.stop)
        await self.models.close()
        if self.health.servicer.models is not self.models:  # a reindex switched to another model's Triton
            await self.health.servicer.models.close()
        await asyncio.to_thread(self.engine.close)


async def start(config: ServiceConfig, progress: bool = False) -> RunningServer:
    """Open the store and index, then serve on config.host:config.port (0 = a free port)."""
    engine = open_collection(config)
    metrics = ServiceMetrics()
    models = Models(config.triton_url, config.logit_scale, config.text_cache_size, observe=metrics.record_triton)
    try:
        dim = await asyncio.to_thread(lambda: engine.dim)
        if dim is not None:  # a known store: serve ids, deletes and stats even while Triton is down
            log.info("index: %s", await asyncio.to_thread(engine.open_index, dim, progress))
    except (StoreUnavailable, StoreSetupError) as exc:  # opened once it answers or is fixed (NOT_SERVING meanwhile)
        log.warning("%s", exc)
    admission = Admission(config.limits, on_shed=metrics.count_shed)
    servicer = SearchServicer(config, engine, models, admission)
    health_servicer = LiveHealth(servicer)
    for name in ("", SERVICE_NAME):  # until Triton has said what it serves
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes), *STREAM_WINDOW]
    # outermost first: every call is recorded (refusals too); only authenticated calls take a slot
    interceptors = [RecordMetrics(metrics), *([BearerTokenAuth(config.bearer_token)] if config.bearer_token else []),
                    ShedLoad(admission, by_token=bool(config.bearer_token)), ParseRequests()]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, _credentials(config)) if config.tls_cert else server.add_insecure_port(address)
    await server.start()
    watch = asyncio.create_task(_watch_models(health_servicer))
    retry = asyncio.create_task(servicer.caption_retries.run())
    endpoint = None
    if config.metrics_port is not None:
        metrics.watch(admission, engine, models.text_cache, models)
        endpoint = metrics.serve(config.host, config.metrics_port)
    return RunningServer(server, port, engine, models, health_servicer, watch, retry, endpoint)


def open_collection(config: ServiceConfig) -> Collection:
    """The collection the config names: the embedded SQLite + FAISS store, or a Milvus collection."""
    if config.vector_store == "milvus":
        return MilvusCollection(config.data_dir, config.milvus)
    return Engine(config.data_dir, config.index, config.snapshot_every, config.schema, config.max_search_depth)


def _credentials(config: ServiceConfig) -> grpc.ServerCredentials:
    pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair])


class SharedAnswer:
    """`ask()` (a coroutine function) asked once for many callers: one question in flight, its answer reused
    for `ttl_s` seconds after it came."""

    def __init__(self, ask: Callable[[], Awaitable], ttl_s: float):
        self.ask, self.ttl_s = ask, ttl_s
        self.asked = 0  # questions actually asked (what tests count)
        self._task: Optional[asyncio.Future] = None
        self._answered_at = float("-inf")

    async def __call__(self):
        loop = asyncio.get_running_loop()
        if self._task is None or (self._task.done() and loop.time() - self._answered_at >= self.ttl_s):
            self.asked += 1
            self._task = asyncio.ensure_future(self._answer())
        return await asyncio.shield(self._task)  # a caller that gives up does not cancel the others' answer

    async def _answer(self):
        # Stamped inside the task, so it is set before done() is true (a done callback runs a turn later, and
        # a caller in between saw the old stamp and asked again).
        try:
            return await self.ask()
        finally:
            self._answered_at = asyncio.get_running_loop().time()


class LiveHealth(health.aio.HealthServicer):
    """Health that follows Triton and the store: SERVING while Triton answers with the store's model
    and weights and the store can be reached, NOT_SERVING otherwise. Check is unauthenticated, so it never
    costs a Triton question and a store RPC each: Checks share one refresh in flight and reuse its answer
    for HEALTH_CHECK_TTL_S (Triton within TRITON_CHECK_S). Watch streams the changes the poller sees every
    HEALTH_POLL_S."""

    def __init__(self, servicer: SearchServicer):
        super().__init__()
        self.servicer = servicer
        self._last: Optional[int] = None
        self.checked = SharedAnswer(self.refresh, HEALTH_CHECK_TTL_S)

    async def refresh(self) -> None:
        problem = await self.servicer.models_problem(TRITON_CHECK_S) or await self.servicer.store_problem()
        admission = self.servicer.admission
        if problem is None and admission.capacity_outdated(self.servicer.models.capacity_source()):
            await _learn_decoder_capacity(self.servicer)
        status = health_pb2.HealthCheckResponse.SERVING if problem is None else health_pb2.HealthCheckResponse.NOT_SERVING
        if problem is not None and self._last != status:
            log.warning("not serving: %s", problem)
        if status != self._last:
            self._last = status
            for name in ("", SERVICE_NAME):
                await self.set(name, status)
        await _set_endpoint_health(self.servicer.models, self)

    async def Check(self, request, context):
        await self.checked()
        return await super().Check(request, context)


async def _learn_decoder_capacity(servicer: SearchServicer) -> None:
    """Size the caption bounds left to the decoders (admission.py) from their capacity, as the Triton
    endpoints in rotation serve it (read again when they change)."""
    try:
        rows, source = await servicer.models.decoder_capacity(TRITON_CHECK_S)
    except Exception as exc:  # asked again at the next refresh; the bounds stay as they were meanwhile
        log.warning("the decoder's capacity is not known yet: %s", exc)
        return
    servicer.admission.set_decoder_capacity(rows, source)
    log.info("caption bounds from the decoders' capacity: %d rows", rows)


async def _watch_models(health_servicer: LiveHealth) -> None:
    while True:
        await health_servicer.refresh()
        await asyncio.sleep(HEALTH_POLL_S)


async def _set_endpoint_health(models: Models, health_servicer) -> None:
    """Each Triton endpoint under its own health name, "coca.search.v1.SearchService/triton/HOST:PORT":
    SERVING while it is in rotation. (The service itself is SERVING while any endpoint is.)"""
    for endpoint in models.endpoints():
        status = health_pb2.HealthCheckResponse.SERVING if endpoint.healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(endpoint_health_name(endpoint.url), status)


def endpoint_health_name(url: str) -> str:
    return f"{SERVICE_NAME}/triton/{url}"


# ---------------------------------------------------------------- command line
def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search_service.server", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data directory (store, blobs, index snapshot)")
    p.add_argument("--triton", default="127.0.0.1:8001", metavar="HOST:PORT[,HOST:PORT...]",
                   help="Triton gRPC address; several (same model export) share the load and cover for each other")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="allow AddImages server-side paths under DIR (repeatable; none by default)")
    add_backup_argument(p)
    add_store_arguments(p)
    add_operator_arguments(p)
    p.add_argument("--logit-scale", type=float, default=100.0, help="softmax scale of Classify")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--max-duplicate-scan", type=int, default=ServiceConfig.max_duplicate_scan, metavar="N",
                   help="items one FindDuplicates scan reads; a larger collection is refused (default %(default)s)")
    p.add_argument("--intake-mb", type=int, default=ServiceConfig.intake_bytes >> 20, metavar="MB",
                   help="AddImages items held at once, all streams together; a stream beyond it is not read on "
                        "until there is room (backpressure, not an error; default %(default)s)")
    p.add_argument("--text-cache-size", type=int, default=ServiceConfig.text_cache_size,
                   help="recent query-text embeddings kept (LRU; 0 = none; Stats reports hits/misses)")
    p.add_argument("--caption-workers", type=int, default=ServiceConfig.caption_workers,
                   help="hits one search with_captions captions at once (default %(default)s)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--token-file", help="file holding the bearer token clients must send (or several, one per line) "
                   "(or set COCA_SEARCH_TOKEN); kept off the command line so ps does not show it")
    return p.parse_args(argv)


def add_backup_argument(p: argparse.ArgumentParser) -> None:
    """Where the Backup RPC may write; shared with `coca serve`."""
    p.add_argument("--backup-root", metavar="DIR", help="allow Backup calls to write backup folders under DIR (apart "
                   "from every --root; default: off, Backup is refused)")


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Where items live: the embedded FAISS store (default) or a Milvus collection; shared with `coca serve`."""
    p.add_argument("--vector-store", choices=VECTOR_STORES, default="faiss",
                   help="faiss: SQLite + FAISS in --data (default); milvus: a Milvus collection, image bytes in --data")
    p.add_argument("--index", default="Flat", help="FAISS factory string: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 ...")
    p.add_argument("--ef-search", type=int, default=IndexSettings.ef_search, help="HNSW search breadth (FAISS, Milvus)")
    p.add_argument("--nprobe", type=int, default=IndexSettings.nprobe, help="IVF lists searched (FAISS, Milvus)")
    p.add_argument("--field", action="append", default=[], metavar="NAME:TYPE",
                   help=f"declare a metadata field's type ({', '.join(FIELD_TYPES)}): number and date fields can be "
                        "ranged over and ordered by; KEYWORD search reads text fields beside captions (repeatable)")
    p.add_argument("--milvus-uri", default=MilvusSettings.uri, help="Milvus address (default %(default)s)")
    p.add_argument("--milvus-token-file", help="file holding the Milvus token (or set COCA_MILVUS_TOKEN)")
    p.add_argument("--collection", default=MilvusSettings.collection, help="Milvus collection (default %(default)s)")
    p.add_argument("--milvus-index", default=MilvusSettings.index_type, help="Milvus index type: HNSW, IVF_FLAT, FLAT")
    p.add_argument("--milvus-consistency", choices=CONSISTENCY_LEVELS, default=MilvusSettings.consistency,
                   help="default consistency of reads (default %(default)s: a replica sees its own writes)")
    p.add_argument("--accept-embeddings", action="store_true",
                   help="take AddImages items' precomputed embeddings (made on a Triton serving the same export, "
                        "e.g. by `coca index --ray --triton`): trusts every writer not to mislabel images")


def milvus_token(token_file: Optional[str]) -> str:
    """The Milvus token: the file's (--milvus-token-file), else COCA_MILVUS_TOKEN's, else none."""
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get("COCA_MILVUS_TOKEN", "")


def store_settings(args) -> dict:
    """ServiceConfig fields for the options of add_store_arguments."""
    token = milvus_token(args.milvus_token_file)
    return {
        "vector_store": args.vector_store,
        "schema": Schema.parse(args.field),
        "accept_embeddings": args.accept_embeddings,
        "index": IndexSettings(factory=args.index, ef_search=args.ef_search, nprobe=args.nprobe),
        "milvus": MilvusSettings(uri=args.milvus_uri, token=token, collection=args.collection,
                                 index_type=args.milvus_index, ef_search=args.ef_search, nprobe=args.nprobe,
                                 consistency=args.milvus_consistency),
    }


def add_operator_arguments(p: argparse.ArgumentParser) -> None:
    """Metrics and load shedding (search_service/admission.py); shared with `coca serve`."""
    g = p.add_argument_group("operators: metrics and load shedding")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics, HOST as --host (default: off; 0 = a free port)")
    for flag, field, what in (("--max-inflight-search", "search", "SearchText/SearchImage/Classify/Rank/Get/Delete/Stats calls"),
                              ("--max-inflight-ingest", "ingest", "AddImages streams"),
                              ("--max-inflight-caption", "caption", "Caption calls and CaptionStream streams"),
                              ("--max-caption-sequences", "caption_sequences",
                               "decoder rows, num_beams per sequence (Caption + searches with_captions; a hit "
                               "that finds none free comes back uncaptioned)")):
        default = getattr(Limits, field)
        g.add_argument(flag, type=int, default=default, metavar="N",
                       help=f"{what} in flight; as many more wait up to --max-queue-wait for a slot, the rest are "
                            "refused with RESOURCE_EXHAUSTED (default: "
                            + ("%(default)s" if default is not None else "the decoders' capacity_rows, summed over the Triton endpoints in rotation")
                            + "; 0 = no bound)")
    g.add_argument("--max-queue-wait", type=float, default=Limits.queue_wait_s, metavar="S",
                   help="longest wait for a slot past a bound, within the call's deadline; then RESOURCE_EXHAUSTED "
                        "with trailing metadata retry-after-ms (default %(default)s; 0 = refuse at once)")
    g.add_argument("--rate-limit", type=float, default=Limits.rate, metavar="PER_S",
                   help="requests per second per bearer token (per client address without one); 0 = off (default)")
    g.add_argument("--rate-burst", type=int, default=Limits.burst, metavar="N",
                   help="requests a token may send at once under --rate-limit (default: the rate, at least 1)")
    g.add_argument("--reindex-share", type=float, default=ServiceConfig.reindex_share, metavar="F",
                   help="while searches or captions are in flight, a reindex keeps its new model's Triton busy at "
                        "most this fraction of the time, a chunk of 2 images at a time: the searches' p99 holds "
                        "when under 1%% of them overlap re-embedding (default %(default)s; at least "
                        f"{MIN_REINDEX_SHARE:g}; 1 = no throttle)")
    g.add_argument("--caption-retries", type=int, default=RetryPolicy.retries, metavar="N",
                   help="captions on ingest that failed are tried again up to N times in the background "
                        "(default %(default)s; 0 = never)")
    g.add_argument("--caption-retry-wait", type=float, default=RetryPolicy.first_wait_s, metavar="S",
                   help="seconds before the first retry, doubled after each failed one (default %(default)s)")
    v = p.add_argument_group("videos (AddVideos; README \"Video\"): each limit passed is refused by name")
    v.add_argument("--max-video-mb", type=int, default=ServiceConfig.max_video_bytes >> 20, metavar="MB",
                   help="one video file (default %(default)s; bytes sent are also bounded by --max-message-mb)")
    v.add_argument("--video-max-seconds", type=float, default=VideoLimits.max_seconds,
                   help="longest video, in seconds (default %(default)s)")
    v.add_argument("--video-max-pixels", type=int, default=VideoLimits.max_pixels,
                   help="largest frame, width x height (default %(default)s: 4K)")
    v.add_argument("--video-max-samples", type=int, default=VideoLimits.max_samples,
                   help="frames sampled (embedded) from one video (default %(default)s)")
    v.add_argument("--video-max-decoded-gb", type=float, default=VideoLimits.max_decoded_bytes / 2 ** 30,
                   help="raw bytes of all frames decoded from one video, in GiB (default %(default)s)")
    g.add_argument("--caption-retry-rate", type=float, default=RetryPolicy.rate, metavar="PER_S",
                   help="caption retries started per second, at most (default %(default)s)")


def operator_settings(args) -> dict:
    """ServiceConfig fields for the options of add_operator_arguments."""
    limits = Limits(search=args.max_inflight_search, ingest=args.max_inflight_ingest, caption=args.max_inflight_caption,
                    caption_sequences=args.max_caption_sequences, queue_wait_s=args.max_queue_wait,
                    rate=args.rate_limit, burst=args.rate_burst)
    retry = RetryPolicy(retries=args.caption_retries, first_wait_s=args.caption_retry_wait, rate=args.caption_retry_rate)
    video = VideoLimits(max_seconds=args.video_max_seconds, max_pixels=args.video_max_pixels,
                        max_samples=args.video_max_samples, max_decoded_bytes=int(args.video_max_decoded_gb * 2 ** 30))
    return {"limits": limits, "metrics_port": args.metrics_port, "caption_retry": retry, "video": video,
            "max_video_bytes": args.max_video_mb << 20, "reindex_share": args.reindex_share}


def config_from_args(args) -> ServiceConfig:
    token = os.environ.get("COCA_SEARCH_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return ServiceConfig(
        data_dir=Path(args.data), triton_url=args.triton, host=args.host, port=args.port,
        allowed_roots=[Path(r) for r in args.root], backup_root=args.backup_root,
        **store_settings(args), **operator_settings(args), logit_scale=args.logit_scale, max_message_bytes=args.max_message_mb << 20,
        intake_bytes=args.intake_mb << 20, max_duplicate_scan=args.max_duplicate_scan, caption_workers=args.caption_workers,
        tls_cert=args.tls_cert and Path(args.tls_cert), tls_key=args.tls_key and Path(args.tls_key),
        bearer_token=token, text_cache_size=max(0, args.text_cache_size),
    )


async def run(config: ServiceConfig, stop: Optional[asyncio.Event] = None,
              on_serving: Optional[Callable[["RunningServer"], None]] = None) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives. `on_serving(running)` runs once the port is bound
    (config.port 0: the kernel's pick, in running.port) and before the ready line: what depends on the
    address (a web gallery in front) starts there and can print its own address first."""
    _map_large_buffers()  # here, so `coca serve` (which calls run) gets it too
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(config, progress=sys.stderr.isatty())
    if on_serving is not None:
        on_serving(running)
    if config.bearer_token and not config.tls_cert and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("a bearer token over plain TCP on %s can be read on the network: add --tls-cert/--tls-key", config.host)
    store = (f"Milvus {config.milvus.uri} collection {config.milvus.collection}" if config.vector_store == "milvus"
             else f"index {config.index.factory}")
    metrics = "" if running.metrics is None else METRICS_NOTE.format(
        url=f"http://{config.host}:{running.metrics.port}/metrics")
    print(READY_LINE.format(host=config.host, port=running.port) + f" (data {config.data_dir}, "
          f"Triton {config.triton_url}, {store}{metrics})", flush=True)
    try:
        await stop.wait()
    finally:
        await running.stop()
        print("search service stopped", flush=True)


def _map_large_buffers(threshold: int = 1 << 20) -> None:
    """Images (up to 32 MiB each) in their own mmapped memory, returned to the system when freed. glibc otherwise
    raises its mmap threshold to the largest block freed (up to 32 MiB), after which image buffers come from
    per-thread heaps that keep freed memory (peak RSS under 8 AddImages streams of 30 MiB images varied
    734-1,049 MiB without this, 708-808 MiB with it: a small, noisy effect)."""
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD = -3
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"search service: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
