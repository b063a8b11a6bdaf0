"""The gRPC servicer: requests in, engine (store + index) and Triton calls, responses or statuses out."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from coca import media
from coca.errors import CapacityError, InvalidInputError
from coca.prompts import DEFAULT_TEMPLATE, label_prompts
from coca.scoring import classify_probabilities, rank_by_distance
from coca.settings import SamplingParams
from coca.texts import check_text
from serving.errors import SequenceLostError

from .admission import CAPTION, CAPTION_SEQUENCES, SEARCH, Admission, Shed, retry_metadata
from .caption_retry import CaptionRetryJob, Paused
from .config import BackupsOff, PathRefused, ServiceConfig
from .collection import Collection, Hit, QueryError, StoreUnavailable, Unsupported
from .models import ModelIdentity, ModelMismatch, Models, ModelsUnavailable
from .options import (HYBRID, KEYWORD, VECTOR, SearchQuery, filter_from_pb, list_position, list_token,
                      order_from_pb)
from .pb import search_pb2 as pb
from .query import BAD_TOKEN, QueryInputError, decode_token, encode_token, fingerprint
from .duplicates import DuplicateScans, ScanStopped, TooManyItems, check_threshold, nearest_other
from .hybrid import DEFAULT_KEYWORD_WEIGHT
from .pb import search_pb2_grpc
from .backup import BackupError, BackupRunning, BackupThread, file_sha256
from .generations import Generation, GenerationChanged
from .reindex import ReindexFailed, ReindexJob, ReindexRunning, ReindexStatus, Throttle, fill_and_switch
from .blobs import BlobError
from .store import ConflictError, Item, ItemRejected, ModelMismatchError, NewItem, StoreError, StoreSetupError, sha256_hex
from .query import VIDEO_FIELDS
from . import video as videos

log = logging.getLogger("search_service")
# A scene's embedding is the mean of its frames' (search_service/video.py), not its keyframe's: a reindex would
# have to decode every video again through the new model, which is not built; the two are kept apart.
VIDEOS_AND_REINDEX = ("a reindex embeds items from their stored image, and a video scene's embedding needs its "
                      "frames decoded again (not built yet)")

DEFAULT_K = 10
DEFAULT_PAGE_SIZE = 100
DEFAULT_DUPLICATE_THRESHOLD = 0.95
DEFAULT_DUPLICATE_PAGE = 50
DEFAULT_NEIGHBORS, MAX_NEIGHBORS = 10, 100
DEFAULT_FRAMES = 16
MAX_FRAMES = 64
TRITON_CHECK_S = 1.5  # how long health and Stats wait for Triton to say what it serves
MAX_INFLIGHT_BATCHES = 2  # AddImages: batches embedding while earlier ones commit
REINDEX_YIELDS_TO = (SEARCH, CAPTION)  # what users wait on (an ingest does not hold a reindex back)
MAX_ID_CHARS = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_CHARS = 4096
MAX_FIND_HASHES = 1024  # content hashes in one FindContent
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
EMBEDDING_NORM_TOLERANCE = 1e-3  # a precomputed embedding's norm must be within this of 1
BACKUP_PROGRESS_S = 0.5  # how often a Backup stream says how far it got
SWITCH_WAIT_S = 30.0  # how long a search waits for a generation switch to end (the switch's SQLite commit)
OLD_MODELS_GRACE_S = 30.0  # the old generation's Triton connections close this long after a switch
FOLLOW_S = 1.0  # how often (at most) a replica asks which generation a shared store (Milvus alias) names
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder shown text


class ServiceError(Exception):
    """Fail the call (or one AddImages item) with this gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def bad(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_DETAILS_CHARS = 2000  # gRPC clients refuse status details (trailing metadata) over 16 KiB


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failure maps to, and the message the caller sees (cut to MAX_DETAILS_CHARS: a
    message quoting its input, e.g. image bytes, would otherwise reach the client as a transport error)."""
    code, message = _status_of(exc)
    if len(message) > MAX_DETAILS_CHARS:
        message = message[:MAX_DETAILS_CHARS] + f" ... ({len(message) - MAX_DETAILS_CHARS} more characters)"
    return code, message


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, PathRefused):
        return (grpc.StatusCode.NOT_FOUND if exc.not_found else grpc.StatusCode.PERMISSION_DENIED), str(exc)
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, BackupsOff):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (BackupRunning, ReindexRunning)):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, ReindexFailed):
        return grpc.StatusCode.FAILED_PRECONDITION, f"reindex: {exc}"
    if isinstance(exc, (InvalidInputError, QueryError, QueryInputError, ItemRejected)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DecodeError):  # a request (or AddImages item) that does not parse, e.g. a non-UTF-8 string
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc} (string fields must be UTF-8)"
    if isinstance(exc, Shed):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"model server busy: {exc}"
    if isinstance(exc, (ModelsUnavailable, StoreUnavailable, SequenceLostError)):  # asking again may work
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (ModelMismatch, ModelMismatchError, StoreSetupError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, Unsupported):
        return grpc.StatusCode.FAILED_PRECONDITION, f"not offered by this store: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the model server did not answer in time"
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rpc(method):
    """Turn exceptions of a unary handler into a gRPC status with a message."""

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message, trailing_metadata=retry_metadata(exc))

    return handler


def rpc_stream(method):
    """Turn exceptions of a response-streaming handler into a gRPC status with a message (the messages
    sent before stand)."""

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            async with contextlib.aclosing(method(self, request, context)) as responses:  # closed at once if cut
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc), trailing_metadata=retry_metadata(exc))

    return handler


@dataclass
class Prepared:
    """An AddImages item that passed validation and awaits its embedding."""

    index: int
    data: bytes
    sha256: str
    uri: str
    id: str
    metadata: dict[str, str]
    keep_blob: bool
    embedding: Optional[np.ndarray] = None  # given by the caller (--accept-embeddings): no Triton call
    near_duplicate: Optional[float] = None  # AddOptions.near_duplicate_threshold
    skip_near_duplicate: bool = False
    caption: bool = False  # AddOptions.caption
    rewrite: bool = False  # added to a generation the store then switched from (see _rewrite_landed)


TEXT_MODES = {pb.SearchTextRequest.VECTOR: VECTOR, pb.SearchTextRequest.KEYWORD: KEYWORD,
              pb.SearchTextRequest.HYBRID: HYBRID}
CONSISTENCY = {pb.CONSISTENCY_STRONG: "Strong", pb.CONSISTENCY_SESSION: "Session",
               pb.CONSISTENCY_BOUNDED: "Bounded", pb.CONSISTENCY_EVENTUALLY: "Eventually"}


class IntakeBudget:
    """Bytes of AddImages items this process holds at once, all streams together (ServiceConfig.intake_bytes):
    items queued, embedding, committing, until their results are sent. A stream waits for room before it
    reads its next item: it reserves room for the largest item (max_image_bytes and its message) first, and
    gives back what the item did not need once it has it (backpressure, not an error: gRPC's flow control
    holds the client back). Streams get room in the order they asked. An item larger than the whole budget
    takes all of it, so it waits until nothing else is held. A message larger than the reservation (up to
    max_message_bytes) is over-committed at once, never waited for: the total can pass the limit by at most
    that excess per stream, and no stream gets more room until it is back under. Measured (README): peak RSS
    ~3.5x the budget with 30 MiB images (an admitted item is in memory ~3 times on its way in and to Triton)."""

    def __init__(self, limit: int, largest_item: int):
        if limit < 1:
            raise ValueError(f"the intake budget must be at least 1 byte, got {limit}")
        self.limit, self.held, self.peak = limit, 0, 0
        self.largest_item = min(largest_item, limit)  # reserved before a stream reads its next item
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()  # first come, first served

    async def acquire(self, size: int) -> int:
        size = min(size, self.limit)
        if not self._waiting and self.held + size <= self.limit:
            self._take(size)
            return size
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((size, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(size)  # granted as it was cancelled: give it back
            else:
                self._waiting = collections.deque(w for w in self._waiting if w[1] is not granted)
                self._grant()  # a smaller request behind it may fit now
            raise
        return size

    def over_commit(self, size: int) -> int:
        """Account `size` bytes already in memory, at once, even past the limit: waiting for them while holding
        a reservation could deadlock with a stream queued ahead (review item 1). Later acquires wait until
        the total is back under the limit, so a stream over-commits at most one message at a time."""
        self._take(size)
        return size

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.limit:
            size, granted = self._waiting.popleft()
            if not granted.done():
                self._take(size)
                granted.set_result(None)

    def stream_hold(self) -> "StreamHold":
        return StreamHold(self)


class StreamHold:
    """One AddImages stream's share of the IntakeBudget, by item index: released when the item's batch is done,
    and all of it when the stream ends however it ends."""

    def __init__(self, budget: IntakeBudget):
        self.budget = budget
        self.by_index: dict[int, int] = {}

    async def take(self, index: int, size: int) -> None:
        self.by_index[index] = await self.budget.acquire(size)

    def settle(self, index: int, size: int) -> None:
        """Item `index` turned out to hold `size` bytes: give back the surplus of its reservation, or account
        the excess without waiting (a message larger than the largest valid image is refused later, but its
        bytes are in memory now; waiting for room while holding the reservation could deadlock)."""
        reserved = self.by_index[index]
        if size <= reserved:
            self.budget.release(reserved - size)
            self.by_index[index] = size
        else:
            self.by_index[index] = reserved + self.budget.over_commit(size - reserved)

    def give_back(self, index: int) -> None:
        self.budget.release(self.by_index.pop(index, 0))

    def release_batch(self, done: asyncio.Task) -> None:
        if not done.cancelled() and done.exception() is None:
            for result in done.result():
                self.give_back(result.index)

    def release_all(self) -> None:
        for index in list(self.by_index):
            self.give_back(index)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, config: ServiceConfig, engine: Collection, models: Models,
                 admission: Optional[Admission] = None):
        self.config = config
        self.engine = engine
        self.models = models
        self.admission = admission or Admission(config.limits)  # bounds decoder sequences (load shedding)
        self.caption_params = SamplingParams()
        self._bound: Optional[ModelIdentity] = None  # what this process bound the store to (Triton's first answer)
        self._opening = asyncio.Lock()
        self.duplicate_scans = DuplicateScans()  # FindDuplicates: its own thread; pages slice one snapshot
        self.backups = BackupThread()  # Backup: its own thread, one at a time
        self.reindexing = ReindexJob()  # Reindex: one at a time, a task of this loop
        # the generation self.models embeds for (searches answer only while the engine answers from it too)
        self._models_generation = getattr(engine, "generation", 0) or 0
        self._follow_at = 0.0  # when to ask the store again which generation it answers from (_follow_store)
        self._following = asyncio.Lock()
        self._checking: Optional[asyncio.Task] = None  # the one health check in flight (probes share it)
        self.intake = IntakeBudget(config.intake_bytes, config.max_image_bytes + (1 << 20))  # AddImages bytes held at once, all streams
        # ingest captions that failed, tried again in the background (server.py runs caption_retries.run())
        self.caption_retries = CaptionRetryJob(engine.retry_book, config.caption_retry, self._retry_caption)

    # ------------------------------------------------------------ helpers
    def _timeout(self, context) -> float:
        """Seconds left for model calls: the client's deadline, else the configured bound."""
        remaining = context.time_remaining() if context is not None else None
        return self.config.triton_timeout_s if remaining is None else max(remaining, 0.001)

    async def ensure_models(self, context=None, fresh: bool = False, timeout: Optional[float] = None) -> None:
        """Triton answers and serves the store's model and weights (asked now when `fresh`); the index is
        open. ModelMismatch when Triton serves other weights than those the store was bound to."""
        models = None
        while models is not self.models:  # a Reindex switched models while the old ones were asked: ask the new
            models = self.models
            identity = await models.identity(timeout or self._timeout(context), fresh=fresh)
        async with self._opening:
            if self._bound is None:
                await self._check_recorded_generation(identity)
                await asyncio.to_thread(self.engine.bind_model, identity.model, identity.pretrained, identity.embed_dim)
                self._bound = identity
                # a Milvus collection knows its generation once bound (the one its alias names)
                self._models_generation = getattr(self.engine, "generation", None) or 0
            elif identity != self._bound and models is self.models:  # (else a switch came in between: it stands)
                raise ModelMismatch(f"Triton at {self.models.url} now serves {identity}, but this store holds "
                                    f"embeddings of {self._bound}: serve those weights again (or use another --data)")
            if not self.engine.is_open:
                await asyncio.to_thread(self.engine.open_index, identity.embed_dim)
        await self._follow_store(timeout or self._timeout(context), every_call=fresh)

    async def _follow_store(self, timeout: float, every_call: bool = False) -> None:
        """A shared store switched through another replica (Milvus: its alias names another generation now):
        answer from that generation with its models. Asked once per FOLLOW_S at most, or at every call that
        asks afresh (an AddImages batch before its commit: its embeddings must be of the generation it writes)."""
        refresh = getattr(self.engine, "refresh_generation", None)
        if refresh is None or self.reindexing.running or (time.monotonic() < self._follow_at and not every_call):
            return
        self._follow_at = time.monotonic() + FOLLOW_S
        generation = await asyncio.to_thread(refresh)
        if generation is not None and generation != self._models_generation:
            await self._follow(generation, timeout)

    async def _follow(self, generation: int, timeout: float) -> None:
        """Use the models recorded for `generation` (the store answers from it): they must serve its weights."""
        async with self._following:
            if generation == self._models_generation:
                return
            active = (await asyncio.to_thread(self.engine.generation_records)).get("active")
            if active is None or active.gen != generation:
                raise ModelMismatch(f"the store answers from generation {generation} now, whose weights and Triton "
                                    "endpoints are not recorded: restart this replica with --triton serving them")
            models = self.models.like(active.triton)
            try:
                identity = await models.identity(timeout, fresh=True)
                if identity.weights != active.weights:
                    raise ModelMismatch(f"the store answers from {active} now, but Triton at {models.url} serves "
                                        f"{identity}: restart this replica with --triton serving those weights")
            except BaseException:
                await models.close()
                raise
            self._use_models(models, identity, generation)

    async def _check_recorded_generation(self, identity: ModelIdentity) -> None:
        """A store that was reindexed records the weights of the generation it answers from: Triton must serve
        those (the model name alone does not tell two exports apart)."""
        records = await asyncio.to_thread(getattr(self.engine, "generation_records", dict))
        active = records.get("active")
        if active is not None and identity.weights != active.weights:
            raise ModelMismatch(f"Triton at {self.models.url} serves {identity}, but this store answers from "
                                f"{active} (served at {active.triton} when it was switched to): start the service "
                                "with --triton pointing at that export")

    async def models_problem(self, timeout: float) -> Optional[str]:
        """Why Triton cannot serve this store now (None when it can), asked of Triton now, within `timeout`.
        Concurrent callers (health probes, Stats, the health poller) share one check in flight."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._problem(timeout))
        return await asyncio.shield(self._checking)

    async def _problem(self, timeout: float) -> Optional[str]:
        try:
            await self.ensure_models(fresh=True, timeout=timeout)
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return status_of(exc)[1]

    async def store_problem(self) -> Optional[str]:
        """Why the store cannot be reached now (None when it can): a remote one may be down."""
        try:
            await asyncio.to_thread(self.engine.ping)
            return None
        except Exception as exc:
            return status_of(exc)[1]

    def check_image(self, data: bytes, name: str = "") -> None:
        """Size, format and pixel-count checks from the header alone (the model decodes it again)."""
        name = name or f"<bytes, {len(data)} B>"
        if not data:
            raise bad(f"{name}: empty image (0 bytes)")
        if len(data) > self.config.max_image_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{name}: {len(data)} bytes, over the limit of {self.config.max_image_bytes}")
        media.image_header(data, name, self.config.max_pixels)

    # ------------------------------------------------------------ AddImages
    @rpc_stream
    async def AddImages(self, request_iterator, context) -> AsyncIterator[pb.AddImageResult]:
        await self.ensure_models(context=context)  # Triton down, deadline passed: results sent stand, the rest fail
        async for result in self._add_stream(context):  # read by context.read (_message_reader), not the iterator
            yield result

    async def _add_stream(self, context) -> AsyncIterator[pb.AddImageResult]:
        """Batches of whatever has arrived (up to add_batch), a few in flight, results in request order.

        A batch starts as soon as one item is there, so a client that waits for each
        result before sending the next item is served too. If the stream breaks (a message
        that does not parse), the items before it are still committed and acknowledged,
        then the stream fails with the error.
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * self.config.add_batch)
        hold = self.intake.stream_hold()
        reader = asyncio.create_task(_read_stream(_message_reader(context), queue, hold, self._intake_bytes))
        inflight: collections.deque[asyncio.Task] = collections.deque()
        next_batch: Optional[asyncio.Task] = None
        ended: bool | Exception = False
        committed = asyncio.get_running_loop().create_future()
        committed.set_result(None)
        try:
            while True:
                if next_batch is None and not ended and len(inflight) < MAX_INFLIGHT_BATCHES:
                    next_batch = asyncio.create_task(_take_batch(queue, self.config.add_batch))
                waiting = [t for t in (next_batch, inflight[0] if inflight else None) if t is not None]
                if not waiting:
                    if isinstance(ended, Exception):
                        raise ended
                    return
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if next_batch is not None and next_batch.done():
                    batch, ended = next_batch.result()
                    next_batch = None
                    if batch:
                        turn = asyncio.get_running_loop().create_future()
                        inflight.append(asyncio.create_task(self._add_batch(batch, context, committed, turn)))
                        committed = turn
                while inflight and inflight[0].done():
                    done = inflight.popleft()
                    hold.release_batch(done)
                    for result in done.result():
                        yield result
        finally:
            for task in (reader, next_batch, *inflight):
                if task is not None:
                    task.cancel()
            hold.release_all()  # what this stream still held (queued, cut short): the other streams' room
            log.debug("AddImages stream ended: intake %d of %d bytes held, peak %d", self.intake.held,
                      self.intake.limit, self.intake.peak)

    def _intake_bytes(self, request: pb.AddImageRequest) -> int:
        """What an item holds in this process until its batch is done: its message, and a server-side file
        (read when prepared) at its largest."""
        return request.ByteSize() + (self.config.max_image_bytes if request.WhichOneof("source") == "path" else 0)

    async def _add_batch(self, batch: list[tuple[int, pb.AddImageRequest]], context,
                         previous: asyncio.Future, turn: asyncio.Future) -> list[pb.AddImageResult]:
        """Validate, embed (concurrently, each its own Triton request), commit together, report each.

        Batches embed concurrently but commit in stream order (each waits for `previous`,
        then completes `turn`), so the first copy of repeated content is the one ADDED.
        """
        try:
            prepared = await asyncio.to_thread(self._prepare_all, batch)
            indices = [i for i, _ in batch]
            batch.clear()  # the messages: each item's bytes are in its Prepared now (protobuf gave a copy)
            pending = [p for p in prepared if isinstance(p, Prepared) and p.embedding is None]
            while True:  # again when the store switched model generations while these were embedded
                models, generation = self.models, self._models_generation
                vectors = await models.embed_images_each([p.data for p in pending], self._timeout(context))
                results = {r.index: r for r in prepared if isinstance(r, pb.AddImageResult)}
                if pending:  # the embeddings come from the weights the store holds: asked again, not assumed
                    await self.ensure_models(context=context, fresh=True)
                ready = [(p, p.embedding) for p in prepared if isinstance(p, Prepared) and p.embedding is not None]
                for p, vector in zip(pending, vectors):
                    if isinstance(vector, ModelsUnavailable):
                        raise vector  # Triton is down: fail the stream, nothing below was acknowledged
                    if isinstance(vector, BaseException):
                        results[p.index] = _failed(p.index, vector, p.sha256)
                    else:
                        ready.append((p, vector))
                ready.sort(key=lambda pair: pair[0].index)  # stream order: the first copy of repeated content is ADDED
                await previous
                try:
                    if ready:
                        outcomes = await asyncio.to_thread(self._commit, ready, generation)
                        for (p, _), outcome in zip(ready, outcomes):
                            results[p.index] = outcome
                    break
                except GenerationChanged as changed:
                    for item_id in _rewrite_landed(prepared, changed.results):  # (answered FAILED below: not kept)
                        await asyncio.to_thread(self.engine.delete, item_id)
                    log.info("AddImages batch embedded by the previous model generation: embedding it again")
                    prepared = [_stale_embedding(p) if isinstance(p, Prepared) and p.embedding is not None else p
                                for p in prepared]
            if not turn.done():
                turn.set_result(None)  # the next batch may commit while these are captioned
            await self._caption_added([(p, results[p.index]) for p, _ in ready if p.caption], context)
            return [results[i] for i in indices]
        finally:
            if not turn.done():
                turn.set_result(None)

    async def _caption_added(self, added: list[tuple[Prepared, pb.AddImageResult]], context) -> None:
        """AddOptions.caption: caption the items just stored, concurrently; store each caption and put it in
        the item's result. A failure is the result's caption_error, not the add's."""
        stored = [(p, r) for p, r in added if r.id and r.outcome in (pb.AddImageResult.ADDED,
                                                                      pb.AddImageResult.NEAR_DUPLICATE)]
        captions = await asyncio.gather(*(self._caption(p.data, self.caption_params, self._timeout(context))
                                          for p, _ in stored), return_exceptions=True)
        made, failed = {}, {}
        for (_, result), caption in zip(stored, captions):
            if isinstance(caption, BaseException):
                result.caption_error = failed[result.id] = status_of(caption)[1]
            else:
                result.caption = made[result.id] = caption.text
        if made:
            await asyncio.to_thread(self.engine.set_captions, made)
        if failed:
            await asyncio.to_thread(self.caption_retries.record_failures, failed)

    async def _retry_caption(self, item_id: str) -> bool:
        """The retry job's try (caption_retry.CaptionRetryJob): caption a stored item that still lacks a
        caption and store it; False when it no longer needs one. Paused when the try could not happen."""
        problem = await self.models_problem(TRITON_CHECK_S)  # Triton down or serving other weights: wait
        if problem is not None:
            raise Paused(problem)
        try:
            item = await asyncio.to_thread(self.engine.get, item_id)
            if item is None or item.caption:
                return False
            data = await self._caption_input(item, self.config.triton_timeout_s)
            caption = await self._caption(data, self.caption_params, self.config.triton_timeout_s)
        except (ModelsUnavailable, StoreUnavailable, Shed, CapacityError) as exc:  # busy or down: not the item's fault
            raise Paused(status_of(exc)[1]) from None
        except Exception as exc:
            raise RuntimeError(status_of(exc)[1]) from None
        await asyncio.to_thread(self.engine.set_captions, {item_id: caption.text})
        return True

    def _prepare_all(self, batch) -> list:
        out = []
        for index, request in batch:
            try:
                out.append(self._prepare(index, request))
            except StoreUnavailable:  # not this item's fault: the stream fails, as when Triton is down
                raise
            except Exception as exc:
                out.append(_failed(index, exc))
        return out

    def _prepare(self, index: int, request: pb.AddImageRequest):
        item_id = _check_id(request.id) if request.id else ""
        metadata = _check_user_metadata(dict(request.metadata))
        try:
            self.config.schema.check_metadata(metadata)
        except ValueError as exc:
            raise bad(str(exc)) from None
        given = self._given_embedding(request.embedding) if request.HasField("embedding") else None
        source = request.WhichOneof("source")
        if source == "image":
            data, uri, keep = request.image, self._check_uri(request.uri), True
            self.check_image(data)
        elif source == "path":
            path, data = self._read_server_file(request.path)
            uri, keep = f"file://{path}", False
            self.check_image(data, request.path)
        else:
            raise bad("item has neither image bytes nor a path")
        sha = sha256_hex(data)
        known = self.engine.find_sha(sha)
        if known is not None:  # no model call for content we have
            return pb.AddImageResult(index=index, outcome=pb.AddImageResult.DUPLICATE, id=known.id, content_sha256=sha)
        options = request.options
        near = None
        if options.HasField("near_duplicate_threshold"):
            near = check_threshold(options.near_duplicate_threshold, "options.near_duplicate_threshold")
        elif options.skip_near_duplicates:
            raise bad("options.skip_near_duplicates needs options.near_duplicate_threshold")
        return Prepared(index, data, sha, uri or f"sha256:{sha}", item_id, metadata, keep, given, near,
                        options.skip_near_duplicates, options.caption)

    def _given_embedding(self, given: pb.Embedding) -> np.ndarray:
        """A caller's embedding, if this service trusts its writers' vectors and the vector fits its model.

        Nothing here can tell that the vector is this image's (that takes a model call): hence off by
        default. What is checked: the export it came from (same weights as ours), dimension, finite, unit.
        """
        if not self.config.accept_embeddings:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               "this service embeds images itself and takes no precomputed embeddings "
                               "(start it with --accept-embeddings to trust its writers' vectors)")
        bound = self._bound  # the weights this store holds embeddings of (the stream checked Triton serves them)
        if given.repository_id != bound.weights:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"embedding made with export {given.repository_id[:16]!r}, but this store holds "
                               f"embeddings of {bound.model} ({bound.pretrained}) export {bound.weights[:16]!r}: "
                               "embed with the same export")
        vector = np.asarray(given.values, np.float32)
        if vector.shape != (bound.embed_dim,):
            raise bad(f"embedding has {vector.size} values, the model's embeddings {bound.embed_dim}")
        if not np.isfinite(vector).all():
            raise bad("embedding holds NaN or infinite values")
        norm = float(np.linalg.norm(vector))
        if abs(norm - 1) > EMBEDDING_NORM_TOLERANCE:
            raise bad(f"embedding norm is {norm:.4f}: embeddings are unit vectors")
        return vector

    def _read_server_file(self, given: str) -> tuple[Path, bytes]:
        """The file a client named (under the roots) and its bytes; errors name it as the client did."""
        path = self.config.resolve_path(given)
        try:
            if path.stat().st_size > self.config.max_image_bytes:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{given}: over the image size limit of {self.config.max_image_bytes} bytes")
            return path, path.read_bytes()
        except OSError as exc:  # gone or unreadable since it was resolved; its message holds the real path
            raise PathRefused(f"{given!r}: cannot read it ({exc.strerror or type(exc).__name__})",
                              not_found=isinstance(exc, FileNotFoundError)) from None

    def _check_uri(self, uri: str) -> str:
        """A label shown to clients (and on terminals): bounded, and no control characters in it."""
        if len(uri) > self.config.max_uri_chars:
            raise bad(f"uri is {len(uri)} characters long, over the limit of {self.config.max_uri_chars}")
        unsafe = next((c for c in uri if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS), None)
        if unsafe is not None:
            raise bad(f"uri {uri[:40]!r} holds the control character {unsafe!r}: uris must be printable text")
        return uri

    def _commit(self, ready: list[tuple[Prepared, np.ndarray]], generation: int = 0) -> list[pb.AddImageResult]:
        """Blobs first (fsynced), then one transaction for the batch; only then are results sent. With a
        near-duplicate check, one item at a time (each must see the ones before it). GenerationChanged when the
        store no longer answers from `generation`, the one that embedded them (its `results`: what was committed
        there all the same)."""
        done: list[pb.AddImageResult] = []
        try:
            if any(p.near_duplicate is not None for p, _ in ready):
                for one in ready:
                    done.extend(self._commit_checked(one, generation))
                return done
            items = [_new_item(p, vector) for p, vector in ready]
            return [_added(p, outcome) for (p, _), outcome in zip(ready, self._add_items(items, generation))]
        except GenerationChanged as changed:
            changed.results = done + [_added(p, outcome) for (p, _), outcome in zip(ready[len(done):], changed.committed)]
            raise

    def _add_items(self, items: list[NewItem], generation: int) -> list:
        """engine.add, checked against the generation where the store has generations."""
        if hasattr(self.engine, "switch_generation"):
            return self.engine.add(items, generation=generation)
        return self.engine.add(items)

    def _commit_checked(self, ready: tuple[Prepared, np.ndarray], generation: int = 0) -> list[pb.AddImageResult]:
        p, vector = ready
        near = None if p.near_duplicate is None else nearest_other(self.engine, vector, p.sha256, "Strong")
        if near is not None and near.score < p.near_duplicate:
            near = None
        if near is not None and p.skip_near_duplicate:
            return [pb.AddImageResult(index=p.index, outcome=pb.AddImageResult.NEAR_DUPLICATE, content_sha256=p.sha256,
                                      near_duplicate=pb.NearDuplicate(id=near.item.id, score=near.score))]
        (outcome,) = self._add_items([_new_item(p, vector)], generation)
        result = _added(p, outcome)
        if near is not None and result.outcome == pb.AddImageResult.ADDED:
            result.outcome = pb.AddImageResult.NEAR_DUPLICATE
            result.near_duplicate.CopyFrom(pb.NearDuplicate(id=near.item.id, score=near.score))
        return [result]

    @rpc
    async def FindContent(self, request: pb.FindContentRequest, context) -> pb.FindContentResponse:
        hashes = list(request.content_sha256)
        if not 1 <= len(hashes) <= MAX_FIND_HASHES:
            raise bad(f"give 1..{MAX_FIND_HASHES} content hashes, got {len(hashes)}")
        for i, sha in enumerate(hashes):
            if not SHA256_HEX.fullmatch(sha):
                raise bad(f"content_sha256 #{i}: {sha[:70]!r} is not 64 lowercase hex digits")
        if not self.engine.is_open:  # a known store answers without Triton
            await self.ensure_models(context=context)

        def find() -> list[str]:
            return [found.id if (found := self.engine.find_sha(sha) or self.engine.find_video_sha(sha)) is not None
                    else "" for sha in hashes]

        return pb.FindContentResponse(ids=await asyncio.to_thread(find))

    # ------------------------------------------------------------ search
    @rpc
    async def SearchText(self, request: pb.SearchTextRequest, context) -> pb.SearchResponse:
        text = check_text(request.text, "text", self.config.max_text_chars).strip()
        mode = TEXT_MODES.get(request.mode)
        if mode is None:
            raise bad(f"unknown mode {request.mode}: VECTOR, KEYWORD or HYBRID")
        weight = request.keyword_weight if request.HasField("keyword_weight") else DEFAULT_KEYWORD_WEIGHT
        query = self._query(request.options, mode, ["text", text, request.mode, weight] if mode != VECTOR
                            else ["text", text], text=text, keyword_weight=weight)
        await self.ensure_models(context=context)

        async def answer(models: Models) -> pb.SearchResponse:
            if mode == KEYWORD:
                return await self._answer(query, context)
            vector = (await models.embed_texts([text], self._timeout(context)))[0]  # VECTOR, HYBRID: by embedding
            return await self._answer(dataclasses.replace(query, vector=vector), context)

        return await self._in_one_generation(answer)

    @rpc
    async def SearchImage(self, request: pb.SearchImageRequest, context) -> pb.SearchResponse:
        by_image = request.WhichOneof("query") == "image"
        query = self._query(request.options, VECTOR, ["image", request.image] if by_image else ["id", request.id])
        if by_image or not self.engine.is_open:
            await self.ensure_models(context=context)  # by id, a known store needs no Triton

        async def answer(models: Models) -> pb.SearchResponse:
            vector = await self._image_vector(request.image if by_image else None, request.id, context, models)
            return await self._answer(dataclasses.replace(query, vector=vector), context)

        return await self._in_one_generation(answer)

    async def _in_one_generation(self, answer) -> pb.SearchResponse:
        """`answer(models)` with the query embedded by the model of the generation the index answers from; run
        again when a switch (Reindex) came in between, waited for while it commits (SWITCH_WAIT_S at most)."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:
            models, generation = self.models, self._models_generation
            if getattr(self.engine, "generation", 0) == generation:
                try:
                    response = await answer(models)
                except Exception:
                    if not self._switched_since(models, generation) or time.monotonic() > deadline:
                        raise
                    continue
                if not self._switched_since(models, generation):
                    response.answered_by = self._answered_by()
                    return response
            if time.monotonic() > deadline:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the store is switching model generations; ask again")
            store_generation = getattr(self.engine, "generation", 0)
            if store_generation is not None and not self.reindexing.running and hasattr(self.engine,
                                                                                        "refresh_generation"):
                await self._follow(store_generation, self.config.triton_timeout_s)  # switched by another replica
            await asyncio.sleep(0.01)

    def _switched_since(self, models: Models, generation: int) -> bool:
        return self.models is not models or getattr(self.engine, "generation", 0) != generation

    def _answered_by(self) -> str:
        """Which generation and model answer searches now (SearchResponse/StatsResponse.answered_by)."""
        bound = f": {self._bound}" if self._bound is not None else ""
        return f"generation {self._models_generation}{bound}"


    def _query(self, options: pb.SearchOptions, mode: str, names: list, **given) -> SearchQuery:
        """The one query value of a search request (checked: INVALID_ARGUMENT names what was wrong)."""
        k = options.k or DEFAULT_K
        if not 1 <= k <= self.config.max_k:
            raise bad(f"k must be in [1, {self.config.max_k}], got {options.k}")
        min_score = options.min_score if options.HasField("min_score") else None
        if min_score is not None and not (math.isfinite(min_score) and -1 <= min_score <= 1):
            raise bad(f"min_score must be a cosine similarity in [-1, 1], got {min_score}")
        if options.consistency and options.consistency not in CONSISTENCY:
            raise bad(f"unknown consistency {options.consistency}")
        schema = self.config.schema
        filters = filter_from_pb(_check_metadata(dict(options.filters), "filter"), options.where, schema)
        return SearchQuery.build(mode, k, names, options.page_token, filters=filters, min_score=min_score,
                                 order=order_from_pb(options.order_by, schema), max_depth=self.config.max_search_depth,
                                 consistency=CONSISTENCY.get(options.consistency),
                                 with_captions=options.with_captions, group_by_video=options.group_by_video, **given)

    async def _image_vector(self, data: Optional[bytes], item_id: str, context,
                            models: Optional[Models] = None) -> np.ndarray:
        """The embedding of image bytes (through Triton) or of an indexed item (stored)."""
        if data is not None:
            self.check_image(data)
            vector = (await (models or self.models).embed_images_each([data], self._timeout(context)))[0]
            if isinstance(vector, BaseException):
                raise vector
            return vector
        if not item_id:
            raise bad("give image bytes or the id of an indexed image")
        item = await asyncio.to_thread(self.engine.get, item_id, True)
        if item is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}")
        return item.embedding

    async def _answer(self, query: SearchQuery, context) -> pb.SearchResponse:
        """One page of the query's ranking (see options.py), as protobuf."""
        hits, token = await asyncio.to_thread(query.page, self.engine)
        errors = await self._caption_hits(hits, context) if query.with_captions else {}
        return pb.SearchResponse(hits=[_hit(h, errors.get(h.item.id, "")) for h in hits], searched=self.engine.size,
                                 next_page_token=token)

    async def _caption_hits(self, hits: list[Hit], context) -> dict[str, str]:
        """Caption the hits that have no caption: `caption_workers` at a time (each reads its image,
        then runs one decoder sequence), each caption stored as soon as it is made, so the work done
        stands even if the call then fails or passes its deadline. Returns the errors by item id."""
        pending = collections.deque(h.item for h in hits if not h.item.caption)
        errors: dict[str, str] = {}

        async def worker():
            while pending:
                item = pending.popleft()
                try:
                    data = await self._caption_input(item, self._timeout(context))
                    caption = await self._caption(data, self.caption_params, self._timeout(context))
                except ModelsUnavailable:
                    raise  # Triton is down: the search fails UNAVAILABLE
                except Exception as exc:
                    errors[item.id] = status_of(exc)[1]
                    continue
                await asyncio.to_thread(self.engine.set_captions, {item.id: caption.text})
                item.caption = caption.text

        workers = [asyncio.create_task(worker()) for _ in range(min(self.config.caption_workers, len(pending)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        return errors

    # ------------------------------------------------------------ model calls
    @rpc
    async def Caption(self, request: pb.CaptionRequest, context) -> pb.CaptionResponse:
        params = sampling_params(request.sampling)
        await self.ensure_models(context=context)
        with self.admission.hold(CAPTION_SEQUENCES, params.num_beams):  # a row per beam
            source = await self._caption_source(request, context)
            caption = await self.models.caption(source, params, self._timeout(context))
        return pb.CaptionResponse(text=caption.text, tokens=caption.tokens, logprobs=caption.logprobs)

    @rpc_stream
    async def CaptionStream(self, request: pb.CaptionRequest, context) -> AsyncIterator[pb.CaptionChunk]:
        """Caption's answer as the decoder writes it: a chunk each time the text grows, then the last one.
        A cancelled call closes the step iterator, which ends the decoder sequence; the slot is freed."""
        params = sampling_params(request.sampling)
        await self.ensure_models(context=context)
        with self.admission.hold(CAPTION_SEQUENCES, params.num_beams):  # a row per beam
            source = await self._caption_source(request, context)
            sent = ""
            steps = self.models.caption_steps(source, params, self._timeout(context))
            async with contextlib.aclosing(steps):
                async for step in steps:
                    piece = step.text[len(sent):]  # the decoder's text so far only ever grows (text_so_far)
                    if step.done:
                        yield pb.CaptionChunk(piece=piece, text=step.text, token_count=len(step.tokens), done=True,
                                              caption=pb.CaptionResponse(text=step.text, tokens=step.tokens,
                                                                         logprobs=step.logprobs))
                    elif piece:
                        sent = step.text
                        yield pb.CaptionChunk(piece=piece, text=sent, token_count=len(step.tokens))

    async def _caption_source(self, request: pb.CaptionRequest, context):
        """What a Caption request captions: image bytes (given, or an indexed item's), or a video's
        ImageEmbeddings (its frames' mean, from Triton)."""
        media = request.WhichOneof("media")
        if media != "video":
            return await self._image_bytes(request.image if media == "image" else None, request.id)
        frames = request.frames or DEFAULT_FRAMES
        if not 1 <= frames <= MAX_FRAMES:
            raise bad(f"frames must be in [1, {MAX_FRAMES}], got {request.frames}")
        if len(request.video) > self.config.max_image_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "video over the size limit")
        return await self.models.video_embeddings(request.video, frames, self._timeout(context))

    async def _caption_input(self, item: Item, timeout: float) -> Union[bytes, np.ndarray]:
        """What captions a stored item: its image; a video scene's, the mean ImageEmbeddings of its sampled
        frames, decoded again from the stored video (the model card's video caption, as at ingest). A scene of
        a video stored before its sampling interval was kept: its keyframe."""
        scene = videos.scene_of(item.id, item.metadata, item.caption)
        video = scene and await asyncio.to_thread(self.engine.get_video, scene.video_id)
        if not video or video.every_s is None:
            return await asyncio.to_thread(_read_image, self.engine, item)

        async def encode(frames: list[bytes], image_embeddings: bool):
            return await self.models.encode_frames(frames, image_embeddings, timeout)

        return await videos.scene_image_embeddings(self.engine.video_file(video), video.every_s, scene.start_s,
                                                   scene.end_s, self.config.video, encode)

    async def _caption(self, data: bytes, params: SamplingParams, timeout: float):
        """One decoder sequence, if one is free under --max-caption-sequences (Shed otherwise)."""
        with self.admission.hold(CAPTION_SEQUENCES, params.num_beams):  # a row per beam
            return await self.models.caption(data, params, timeout)

    async def _image_bytes(self, data: Optional[bytes], item_id: str) -> bytes:
        if data is not None:
            self.check_image(data)
            return data
        if not item_id:
            raise bad("give image bytes (or a video) or the id of an indexed image")
        item = await asyncio.to_thread(self.engine.get, item_id)
        if item is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}")
        return await asyncio.to_thread(_read_image, self.engine, item)

    async def _ref_vector(self, ref: pb.ImageRef, context) -> np.ndarray:
        if ref.WhichOneof("ref") is None:
            raise bad("give an image: its bytes or the id of an indexed image")
        return await self._image_vector(ref.image if ref.WhichOneof("ref") == "image" else None, ref.id, context)

    def _check_texts(self, texts: list[str], what: str) -> list[str]:
        """Texts the text encoder takes: how many, each one, and all together (the tokenizer's work)."""
        if not texts:
            raise bad(f"give at least one {what}")
        if len(texts) > self.config.max_texts:
            raise bad(f"at most {self.config.max_texts} {what}s, got {len(texts)}")
        for i, text in enumerate(texts):
            check_text(text, f"{what} #{i + 1}", self.config.max_text_chars)
        total = sum(len(t) for t in texts)
        if total > self.config.max_request_text_chars:
            raise bad(f"the {what}s are {total} characters in all, over the limit of "
                      f"{self.config.max_request_text_chars} per request")
        return texts

    @rpc
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        labels = self._check_texts(list(request.labels), "label")
        prompts = self._check_texts(label_prompts(request.template or DEFAULT_TEMPLATE, labels), "prompt")
        await self.ensure_models(context=context)
        image = await self._ref_vector(request.image, context)
        texts = await self.models.embed_texts(prompts, self._timeout(context))
        order, probs, similarity = classify_probabilities(texts, image, self.models.logit_scale)
        return pb.ClassifyResponse(labels=[
            pb.LabelScore(label=labels[i], probability=float(probs[i]), similarity=float(similarity[i])) for i in order])

    @rpc
    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        texts = self._check_texts(list(request.texts), "text")
        await self.ensure_models(context=context)
        image = await self._ref_vector(request.image, context)
        order, distances = rank_by_distance(await self.models.embed_texts(texts, self._timeout(context)), image)
        return pb.RankResponse(texts=[pb.TextScore(text=texts[i], distance=float(distances[i])) for i in order])

    # ------------------------------------------------------------ items
    @rpc
    async def Get(self, request: pb.GetRequest, context) -> pb.Item:
        if not request.id:
            raise bad("give the id of an item")
        item = await asyncio.to_thread(self.engine.get, request.id, request.include_embedding)
        if item is None:
            video = await asyncio.to_thread(self.engine.get_video, request.id)
            if video is None:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {request.id!r}")
            return pb.Item(id=video.id, content_sha256=video.sha256, uri=video.uri, metadata=video.metadata,
                           created_at=video.created_at, updated_at=video.created_at,
                           video=videos.stored_video_info(video))
        reply = _item(item, request.include_embedding)
        if request.include_image:
            reply.image = await asyncio.to_thread(_read_image, self.engine, item)
        return reply

    @rpc
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        if not request.id:
            raise bad("give the id of an item")
        if not self.engine.is_open:  # nothing was ever indexed
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {request.id!r}")
        stored = await asyncio.to_thread(self.engine.get, request.id)
        scene = stored and videos.scene_of(stored.id, stored.metadata, stored.caption)
        if scene is not None:  # a video and its scenes are stored and deleted together
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{request.id!r} is a scene of the video "
                               f"{scene.video_id!r}: delete the video (with all its scenes)")
        item = await asyncio.to_thread(self.engine.delete, request.id)
        if item is None:
            item = await asyncio.to_thread(self.engine.delete_video, request.id)  # a video goes with its scenes
        if item is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {request.id!r}")
        return pb.DeleteResponse(id=item.id)

    @rpc
    async def List(self, request: pb.ListRequest, context) -> pb.ListResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= self.config.max_page_size:
            raise bad(f"page_size must be in [1, {self.config.max_page_size}], got {request.page_size}")
        schema = self.config.schema
        filters = filter_from_pb(_check_metadata(dict(request.filters), "filter"), request.where, schema)
        order = order_from_pb(request.order_by, schema)
        query = fingerprint("list", filters.key() if filters else [], order.key() if order else None)
        after = list_position(request.page_token, query)
        if not self.engine.is_open:  # nothing was ever indexed
            return pb.ListResponse()
        page = await asyncio.to_thread(self.engine.list_items, filters, order, after, size, request.include_embeddings)
        return pb.ListResponse(items=[_item(i, request.include_embeddings) for i in page.items],
                               next_page_token=list_token(page, query), total=page.total)

    @rpc
    async def FindDuplicates(self, request: pb.FindDuplicatesRequest, context) -> pb.FindDuplicatesResponse:
        threshold = request.threshold or DEFAULT_DUPLICATE_THRESHOLD
        size, neighbors = request.page_size or DEFAULT_DUPLICATE_PAGE, request.neighbors or DEFAULT_NEIGHBORS
        check_threshold(threshold, "threshold")
        if not 1 <= size <= self.config.max_page_size:
            raise bad(f"page_size must be in [1, {self.config.max_page_size}], got {request.page_size}")
        if not 1 <= neighbors <= MAX_NEIGHBORS:
            raise bad(f"neighbors must be in [1, {MAX_NEIGHBORS}], got {request.neighbors}")
        query = fingerprint("duplicates", threshold, neighbors, size)
        position = decode_token(request.page_token, query) if request.page_token else {"o": 0, "s": ""}
        start, snapshot_id = position.get("o", -1), position.get("s", "")
        if not isinstance(start, int) or start < 0 or not isinstance(snapshot_id, str):
            raise bad(BAD_TOKEN)
        if not self.engine.is_open:
            return pb.FindDuplicatesResponse()
        groups = self.duplicate_scans.snapshot(snapshot_id) if snapshot_id else None
        if groups is None:  # a first page, or a snapshot no longer kept: scan (once for all who ask now)
            if snapshot_id:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this FindDuplicates answer is no longer "
                                   "kept (newer scans replaced it): start again without page_token")
            remaining = context.time_remaining() if context is not None else None
            deadline = time.monotonic() + remaining if remaining is not None else None
            try:
                snapshot_id, groups = await self.duplicate_scans.scan(
                    self.engine, threshold, neighbors, self.config.max_duplicate_scan, deadline)
            except ScanStopped as exc:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"FindDuplicates: the deadline came first ({exc})")
            except TooManyItems as exc:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        page = groups[start:start + size]
        more = start + size < len(groups)
        return pb.FindDuplicatesResponse(
            groups=[pb.DuplicateGroup(ids=g.ids, pairs=[pb.DuplicatePair(a=a, b=b, score=s) for a, b, s in g.pairs])
                    for g in page],
            next_page_token=encode_token(query, {"o": start + size, "s": snapshot_id}) if more else "",
            total_groups=len(groups))

    @rpc
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        stats = await asyncio.to_thread(self.engine.stats)
        ready = await self.models_problem(TRITON_CHECK_S) is None
        schema = [pb.FieldSpec(name=name, type=kind) for name, kind in self.config.schema.as_pairs()]
        retries = await asyncio.to_thread(self.caption_retries.stats)
        return pb.StatsResponse(**stats, **self.models.text_cache.stats(), **retries, triton_ready=ready, triton_endpoints=[
            pb.TritonEndpoint(address=e.url, healthy=e.healthy, in_flight=e.in_flight, calls=e.calls, outages=e.outages,
                              last_error=e.last_error, down_seconds=e.down_s) for e in self.models.endpoints()],
            repository_id=self._bound.weights if ready else "", precision=self.models.precision if ready else "",
            accepts_embeddings=self.config.accept_embeddings,
            schema=schema, **await self._generation_stats())

    async def _generation_stats(self) -> dict:
        """StatsResponse's model generation fields."""
        records = await asyncio.to_thread(getattr(self.engine, "generation_records", dict))
        old = records.get("old")
        captions = await asyncio.to_thread(getattr(self.engine, "captions_by_old_models", lambda: 0))
        return dict(generation=self._models_generation, answered_by=self._answered_by(),
                    reindex=self.reindexing.describe() or (f"{records['building']} (stopped: RESUME goes on)"
                                                           if "building" in records else ""),
                    old_generation=str(old) if old is not None else "", captions_by_old_models=captions)

    # ------------------------------------------------------------ videos (search_service/video.py)
    @rpc_stream
    async def AddVideos(self, request_iterator, context) -> AsyncIterator[pb.AddVideoResult]:
        """One video at a time, each result sent once it is committed (or failed alone)."""
        await self.ensure_models(context=context)
        if not self.engine.keeps_videos:
            raise Unsupported(self.engine.VIDEOS_MISSING)
        if self.reindexing.running or "building" in await asyncio.to_thread(self.engine.generation_records):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"videos while a reindex is under way: "
                               f"{VIDEOS_AND_REINDEX}; add them once it has switched or been rolled back")
        index = 0
        async for request in request_iterator:
            try:
                yield await self._add_video(index, request, context)
            except (ModelsUnavailable, StoreUnavailable):
                raise  # not this video's fault: the stream fails, as AddImages does
            except Exception as exc:
                code, message = status_of(exc)
                yield pb.AddVideoResult(index=index, outcome=pb.AddImageResult.FAILED,
                                        error=pb.Error(code=code.value[0], message=message))
            index += 1

    @rpc
    async def ReadVideo(self, request: pb.ReadVideoRequest, context) -> pb.VideoBytes:
        """A slice of a stored video, found by its id only (never a path from the client)."""
        if not self.engine.keeps_videos:
            raise Unsupported(self.engine.VIDEOS_MISSING)
        if not request.id:
            raise bad("give the id of a video")
        if not 1 <= request.length <= videos.MAX_READ_BYTES:
            raise bad(f"length must be 1 to {videos.MAX_READ_BYTES} bytes, got {request.length}")
        video = await asyncio.to_thread(self.engine.get_video, request.id)
        if video is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no video with id {request.id!r}")
        try:
            return await asyncio.to_thread(videos.read_slice, self.engine.video_file(video), request.offset,
                                           request.length)
        except videos.OutOfRange as exc:
            raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, f"video {video.id!r}: {exc}") from None
        except OSError:  # its server-side file was moved or removed (no server path in the message)
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"the bytes of video {video.id!r} cannot be read") from None

    async def _add_video(self, index: int, request: pb.AddVideoRequest, context) -> pb.AddVideoResult:
        video = await asyncio.to_thread(self._video_source, request)
        known = await asyncio.to_thread(self.engine.find_video_sha, video.sha256)
        if known is None:
            timeout = self.config.triton_timeout_s  # per call: a long video makes many

            async def encode(frames: list[bytes], image_embeddings: bool):
                return await self.models.encode_frames(frames, image_embeddings, timeout)

            async def caption(embeddings: np.ndarray, params: SamplingParams) -> str:
                with self.admission.hold(CAPTION_SEQUENCES, params.num_beams):
                    return (await self.models.caption(embeddings, params, timeout)).text

            cut = await videos.cut_video(video, self.config.video, encode, caption, self.config.caption_workers)
            await self.ensure_models(context=context, fresh=True)  # the embeddings came from the weights we hold
            outcome = await asyncio.to_thread(self.engine.add_video, *videos.new_video(video, cut))
            if isinstance(outcome, StoreError):
                raise outcome
            result = pb.AddVideoResult(index=index, id=outcome.id, content_sha256=video.sha256,
                                       caption_error=cut.caption_error,
                                       outcome=pb.AddImageResult.ADDED if outcome.added else pb.AddImageResult.DUPLICATE,
                                       video=videos.video_info(cut.duration_s, cut.sampled, outcome.id, outcome.scenes))
            if not outcome.added:  # added meanwhile by another stream: say what is stored
                known = await asyncio.to_thread(self.engine.get_video, outcome.id)
            else:
                return result
        return pb.AddVideoResult(index=index, outcome=pb.AddImageResult.DUPLICATE, id=known.id,
                                 content_sha256=video.sha256, video=videos.stored_video_info(known))

    def _video_source(self, request: pb.AddVideoRequest) -> videos.VideoSource:
        """A checked AddVideos item: id, metadata, options, and its bytes (or server-side file) hashed."""
        item_id = _check_id(request.id) if request.id else ""
        metadata = _check_user_metadata(dict(request.metadata))
        try:
            self.config.schema.check_metadata(metadata)
            settings = videos.settings_from_pb(request.options)
        except ValueError as exc:
            raise bad(str(exc)) from None
        limit = self.config.max_video_bytes
        source = request.WhichOneof("source")
        if source == "video":
            data = request.video
            if not data:
                raise bad("empty video (0 bytes)")
            if len(data) > limit:
                raise bad(f"video is {len(data)} bytes, over the limit max_video_bytes = {limit} (--max-video-mb)")
            name, sha, uri, source_value = f"<bytes, {len(data)} B>", sha256_hex(data), self._check_uri(request.uri), data
        elif source == "path":
            path = self.config.resolve_path(request.path)
            try:
                size = path.stat().st_size
                if size > limit:
                    raise bad(f"{request.path}: {size} bytes, over the limit max_video_bytes = {limit} (--max-video-mb)")
                sha = file_sha256(path)
            except OSError as exc:
                raise PathRefused(f"{request.path!r}: cannot read it ({exc.strerror or type(exc).__name__})",
                                  not_found=isinstance(exc, FileNotFoundError)) from None
            name, uri, source_value = request.path, f"file://{path}", path
        else:
            raise bad("item has neither video bytes nor a path")
        params = None
        if request.options.caption:
            params = (sampling_params(request.options.sampling) if request.options.HasField("sampling")
                      else self.caption_params)
        return videos.VideoSource(source_value, name, sha, uri or f"sha256:{sha}", item_id, metadata, settings, params)

    # ------------------------------------------------------------ operations
    @rpc_stream
    async def Backup(self, request: pb.BackupRequest, context) -> AsyncIterator[pb.BackupProgress]:
        """search_service/backup.py on the backup thread while the service goes on (one at a time: another
        call meanwhile is ABORTED); its progress every BACKUP_PROGRESS_S. Off unless the service has
        --backup-root, and writes under it only. A client that goes away does not stop it (it finishes, or
        leaves no manifest)."""
        backup = getattr(self.engine, "backup", None)
        if backup is None:
            raise Unsupported("backups of this collection")
        if not request.out:
            raise bad("give the backup folder (out), under the service's --backup-root")
        out = self.config.resolve_backup_folder(request.out)
        latest: list[tuple[str, int, int]] = []

        def progress(phase: str, done: int, total: int) -> None:
            latest[:] = [(phase, done, total)]  # the newest only; read by the loop below

        job = self.backups.start(lambda: backup(out, progress))
        async for phase, done, total in changes_until_done(job, lambda: latest[0] if latest else None):
            yield pb.BackupProgress(phase=phase, done=done, total=total)
        try:
            summary = job.result()
        except BackupError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"backup into {request.out!r}: {exc}") from None
        except OSError as exc:  # a full disk, a folder it may not write: said plainly
            raise ServiceError(grpc.StatusCode.INTERNAL, f"backup into {request.out!r} failed: {exc}") from None
        yield pb.BackupProgress(phase="done", done=summary.blobs_copied, total=summary.blobs_copied,
                                summary=pb.BackupSummary(
                                    out=request.out, items=summary.items, blobs=summary.blobs,
                                    blobs_copied=summary.blobs_copied, bytes_copied=summary.bytes_copied,
                                    sequence=summary.sequence, seconds=summary.seconds))


    @rpc_stream
    async def Reindex(self, request: pb.ReindexRequest, context) -> AsyncIterator[pb.ReindexProgress]:
        """Build another model generation while serving and switch to it; or roll back, or drop the old one
        (search_service/reindex.py, generations.py). Its progress every BACKUP_PROGRESS_S, then "done". A
        client that goes away does not stop it; RESUME while it runs listens again."""
        if not hasattr(self.engine, "switch_generation"):
            raise Unsupported("reindexing: this store has no model generations")
        action = request.action
        if action in (pb.ReindexRequest.START, pb.ReindexRequest.RESUME) and self.engine.keeps_videos:
            videos = await asyncio.to_thread(self.engine.store.video_count)
            if videos:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the store holds {videos} videos: {VIDEOS_AND_REINDEX}")
        if action == pb.ReindexRequest.DROP_OLD:
            dropped = await asyncio.to_thread(self.engine.drop_old_generation)
            if dropped is None:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "no old generation is kept (dropped already, "
                                   "or the store was never reindexed)")
            yield pb.ReindexProgress(phase="done", generation=self._models_generation, answered_by=self._answered_by())
            return
        if self.reindexing.running and action == pb.ReindexRequest.RESUME:
            task = self.reindexing.task  # listen to the one running
        else:
            target, models, identity = await self._reindex_target(request, context)
            what = (f"rolling back to {target}" if action == pb.ReindexRequest.ROLLBACK else f"building {target}")

            def switched(active: Generation) -> None:  # on this loop, right after the store switched
                self._use_models(models, identity, active.gen)

            throttle = Throttle(lambda: self.admission.quiet_for(REINDEX_YIELDS_TO), self.config.reindex_share)
            task = self.reindexing.start(what, lambda report: fill_and_switch(
                self.engine, target, models, self.config.triton_timeout_s, report, switched, throttle))
        async for progress in self._reindex_progress(task):
            yield progress

    async def _reindex_progress(self, task: asyncio.Task) -> AsyncIterator[pb.ReindexProgress]:
        # the first message soon: a small store's reindex may take less than a tick
        async for now in changes_until_done(task, lambda: self.reindexing.latest, first_wait_s=0.05):
            yield _reindex_pb(now)
        try:
            active = task.result()
        except asyncio.CancelledError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the reindex stopped with the service; RESUME goes on")
        yield _reindex_pb(self.reindexing.finished(active, self._answered_by()))

    async def _reindex_target(self, request: pb.ReindexRequest, context) -> tuple[Generation, Models, ModelIdentity]:
        """The generation a START, RESUME or ROLLBACK switches to, and the models of its Triton (checked: it
        serves that generation's weights); recorded as being built (START, RESUME)."""
        await self.ensure_models(context=context)  # the store answers now: its own model is known and served
        records = await asyncio.to_thread(self.engine.generation_records)
        action = request.action
        if action == pb.ReindexRequest.START:
            for name, value in (("to_model", request.to_model), ("to_pretrained", request.to_pretrained),
                                ("triton", request.triton)):
                if not value.strip():
                    raise bad(f"give {name}: START names the new model and the Triton endpoints that serve it")
            recorded, triton = None, request.triton
        else:
            state = "building" if action == pb.ReindexRequest.RESUME else "old"
            recorded = records.get(state)
            if recorded is None:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "no reindex to resume" if state == "building"
                                   else "no old generation is kept to roll back to (dropped, or never reindexed)")
            triton = request.triton or recorded.triton
        try:
            models = self.models.like(triton)
        except ValueError as exc:
            raise bad(f"triton: {exc}") from None
        try:
            identity = await self._new_identity(models, context)
            target = self._check_target(request, recorded, identity, models)
        except BaseException:
            await models.close()
            raise
        if action == pb.ReindexRequest.ROLLBACK:
            return target, models, identity
        active = Generation(self._models_generation, self._bound.model, self._bound.pretrained, self._bound.embed_dim,
                            self._bound.weights, self.models.endpoints_spec, "active")
        return await asyncio.to_thread(self.engine.begin_generation, active, target), models, identity

    async def _new_identity(self, models: Models, context) -> ModelIdentity:
        try:
            return await models.identity(self._timeout(context), fresh=True)
        except ModelsUnavailable as exc:
            raise ModelsUnavailable(f"the reindex's Triton: {exc}") from None
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the reindex's Triton at {models.url} did not say in "
                               "time what it serves") from None

    def _check_target(self, request: pb.ReindexRequest, recorded: Optional[Generation], identity: ModelIdentity,
                      models: Models) -> Generation:
        if recorded is None:  # START: Triton serves what was named, and not what the store answers from
            if (identity.model, identity.pretrained) != (request.to_model, request.to_pretrained):
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"Triton at {models.url} serves {identity}, "
                                   f"not {request.to_model} ({request.to_pretrained})")
            if identity.weights == self._bound.weights:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"the store answers from {identity} already")
            return Generation(0, identity.model, identity.pretrained, identity.embed_dim, identity.weights,
                              models.endpoints_spec, "building")
        if identity.weights != recorded.weights:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"Triton at {models.url} serves {identity}, but "
                               f"{recorded} is of other weights: give --triton endpoints serving them")
        return dataclasses.replace(recorded, triton=models.endpoints_spec)

    def _use_models(self, models: Models, identity: ModelIdentity, generation: int) -> None:
        """Answer with `models` from now on (the store switched to their generation); the previous ones are
        closed once the calls still on them are done."""
        previous = self.models
        self.models, self._bound, self._models_generation = models, identity, generation
        log.info("model generation %d answers now: %s (Triton %s)", generation, identity, models.url)

        async def close_later():
            await asyncio.sleep(OLD_MODELS_GRACE_S)
            await previous.close()

        self._closing_models = asyncio.ensure_future(close_later())


# ---------------------------------------------------------------- module helpers
async def _read_stream(read: Callable[[], Awaitable], queue: asyncio.Queue, hold: "StreamHold", size_of) -> None:
    """Feed (index, request) pairs into `queue`, then None; a broken stream ends it with the exception.
    `read()` is the stream's next request, None at its end (_message_reader). Each item first takes its bytes
    from the process's intake budget (`hold`): while there is no room the stream is not read on (backpressure:
    gRPC's flow control holds the client back), never an error. Nothing here holds an item once it is queued:
    its batch lets go of it when it is done, while this may still wait for room for the next one."""
    try:
        index = 0
        while True:
            await hold.take(index, hold.budget.largest_item)  # room for any item before it is read off the wire
            request = await read()
            if request is None:
                hold.give_back(index)  # the stream ended: its last reservation goes back at once
                break
            hold.settle(index, size_of(request))
            await queue.put((index, request))
            del request
            index += 1
        await queue.put(None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(exc)


def _message_reader(context) -> Callable[[], Awaitable]:
    """A request stream's next message (None at its end) by context.read(), not by iterating the stream: gRPC's
    iterator holds the message it gave last until asked for the next one, and an AddImages stream is not asked
    while it waits for intake room (one 32 MiB image per stream outside the budget)."""
    async def read():
        message = await context.read()
        return None if message is grpc.aio.EOF else message

    return read


async def _take_batch(queue: asyncio.Queue, size: int) -> tuple[list, bool | Exception]:
    """The next item (waiting for it) plus whatever else is already queued, up to `size`; and whether the
    stream ended: True, or the exception that broke it (after the items in the batch)."""
    batch = []
    entry = await queue.get()
    while True:
        if isinstance(entry, Exception):
            return batch, entry
        if entry is None:
            return batch, True
        batch.append(entry)
        if len(batch) >= size or queue.empty():
            return batch, False
        entry = queue.get_nowait()


def _stale_embedding(p: Prepared) -> pb.AddImageResult:
    """A caller's embedding of the export the store answered from before a switch that came while it was added."""
    return _failed(p.index, ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "the store switched to another model "
                                         "(Reindex) while this item was added: embed it with the new export"), p.sha256)


async def changes_until_done(job: asyncio.Future, latest: Callable[[], object],
                             first_wait_s: float = BACKUP_PROGRESS_S) -> AsyncIterator:
    """A running job's newest progress (`latest()`) each time it changed, every BACKUP_PROGRESS_S, until done."""
    sent, wait = None, first_wait_s
    while True:
        finished, _ = await asyncio.wait({job}, timeout=wait)
        wait = BACKUP_PROGRESS_S
        if finished:
            return
        now = latest()
        if now is not None and now != sent:
            sent = now
            yield now


def _reindex_pb(status: ReindexStatus) -> pb.ReindexProgress:
    return pb.ReindexProgress(phase=status.phase, done=status.done, total=status.total, rate=status.rate,
                              eta_seconds=status.eta_seconds, generation=status.generation,
                              answered_by=status.answered_by)


def _added(p: Prepared, outcome) -> pb.AddImageResult:
    """The result of committing a prepared item (ADDED, DUPLICATE, or FAILED: an id conflict, a field the store
    cannot hold)."""
    if isinstance(outcome, StoreError):
        return _failed(p.index, outcome, p.sha256)
    kind = pb.AddImageResult.ADDED if outcome.added else pb.AddImageResult.DUPLICATE
    return pb.AddImageResult(index=p.index, outcome=kind, id=outcome.id, content_sha256=p.sha256)


def _new_item(p: Prepared, embedding: np.ndarray) -> NewItem:
    return NewItem(sha256=p.sha256, uri=p.uri, embedding=embedding, id=p.id, metadata=p.metadata,
                   data=p.data if p.keep_blob else None, rewrite=p.rewrite)


def _rewrite_landed(prepared: list, landed: list[pb.AddImageResult]) -> list[str]:
    """Items a commit added to the generation the store then switched from: those the service embeds are added
    again, their rows in the new generation (carried over by the switch, or written through the alias) taking the
    new model's embedding; the ids of those the caller embedded (to be deleted: they fail, embedded by the old
    export)."""
    added = {r.index: r.id for r in landed if r.outcome in (pb.AddImageResult.ADDED, pb.AddImageResult.NEAR_DUPLICATE)}
    unembeddable = []
    for p in prepared:
        if isinstance(p, Prepared) and p.index in added:
            p.rewrite = True
            if p.embedding is not None:
                unembeddable.append(added[p.index])
    return unembeddable


def _failed(index: int, exc: BaseException, sha256: str = "") -> pb.AddImageResult:
    code, message = status_of(exc)
    return pb.AddImageResult(index=index, outcome=pb.AddImageResult.FAILED, content_sha256=sha256,
                             error=pb.Error(code=code.value[0], message=message))


def _check_id(item_id: str) -> str:
    if len(item_id) > MAX_ID_CHARS or not item_id.isprintable() or item_id != item_id.strip():
        raise bad(f"id {item_id[:40]!r}: ids are 1..{MAX_ID_CHARS} printable characters, no surrounding spaces")
    return item_id


def _check_user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata a client stores: bounded, and none of the fields video scenes carry (they say an item is one)."""
    reserved = sorted(set(metadata) & set(VIDEO_FIELDS))
    if reserved:
        raise bad(f"metadata key {reserved[0]!r} is reserved: video scenes carry {', '.join(VIDEO_FIELDS)}")
    return _check_metadata(metadata)


def _check_metadata(metadata: dict[str, str], what: str = "metadata") -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise bad(f"at most {MAX_METADATA_ENTRIES} {what} entries, got {len(metadata)}")
    for key, value in metadata.items():
        if not key or len(key) > MAX_ID_CHARS or len(value) > MAX_METADATA_CHARS:
            raise bad(f"{what} key {key[:40]!r}: keys are 1..{MAX_ID_CHARS} characters, values at most {MAX_METADATA_CHARS}")
    return metadata


def sampling_params(settings: pb.SamplingSettings) -> SamplingParams:
    """SamplingParams from the fields the client set (the others keep their defaults)."""
    values = {field.name: value for field, value in settings.ListFields()}
    return SamplingParams.from_float32(values)  # validates: InvalidInputError -> INVALID_ARGUMENT


def _read_image(engine: Collection, item: Item) -> bytes:
    try:
        return engine.read_image(item)
    except BlobError as exc:  # its message names the item, not server paths
        raise ServiceError(grpc.StatusCode.NOT_FOUND, str(exc)) from None


def _hit(hit: Hit, caption_error: str) -> pb.Hit:
    item = hit.item
    reply = pb.Hit(id=item.id, score=hit.score, metadata=item.metadata, uri=item.uri,
                   caption=item.caption or "", caption_error=caption_error, added_at=item.created_at,
                   vector_rank=hit.vector_rank, keyword_rank=hit.keyword_rank, keyword_score=hit.keyword_score)
    scene = videos.scene_of(item.id, item.metadata, item.caption)
    if scene is not None:
        reply.video_id, reply.start_s, reply.end_s = scene.video_id, scene.start_s, scene.end_s
    return reply


def _item(item: Item, with_embedding: bool) -> pb.Item:
    reply = pb.Item(id=item.id, content_sha256=item.sha256, uri=item.uri, metadata=item.metadata,
                    caption=item.caption or "", created_at=item.created_at, updated_at=item.updated_at,
                    scene=videos.scene_of(item.id, item.metadata, item.caption))
    if with_embedding:
        reply.embedding.extend(item.embedding.tolist())
    return reply
