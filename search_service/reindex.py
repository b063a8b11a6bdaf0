"""Reindex a live store into another model (the Reindex RPC's work; README "Reindex to new weights").

The store side (tables, the switch) is search_service/generations.py (embedded) or milvus_generations.py (a
new collection behind the alias). Here: embedding every live item that
lacks its vector of the generation being built, from its stored bytes, through that generation's Triton
(`fill`), a few batches in flight, each batch committed on its own (a kill loses at most the batches in
flight); then the switch, tried again after another fill while clients keep adding items (each try embeds
what was added since the last one, so under a steady write rate the gap shrinks to nothing).

One reindex at a time (ReindexJob), as a task of the service's event loop: its Triton calls are asynchronous,
its reads, writes and the index build run on worker threads and the engine's writer. A client that stops
listening does not stop it; RESUME listens again (or, after a restart, goes on with what is still missing).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Optional

import numpy as np

from coca.errors import CocaError

from .blobs import BlobError
from .generations import Generation
from .models import Models, ModelsUnavailable

log = logging.getLogger("search_service.reindex")
BATCH = 32  # items per Triton round and per commit
IN_FLIGHT = 2  # batches embedding at once with nothing else asked (3: 1.55x ingest, 2: 1.1-1.8x on 2 shared cores)
SWITCH_TRIES = 20  # fills + switches before giving up on a collection that grows faster than it is reindexed
THROTTLED_CHUNK = 2  # images per Triton call while searches are about (what a search arriving meanwhile shares)
QUIET_S = 0.02  # searches/captions idle this long count as gone (longer than a client's gap between calls)
POLL_S = 0.005  # how often a yielding reindex looks again


class Throttle:
    """The reindex gives way to searches and captions. While one is in flight, queued or ended less than QUIET_S
    ago, it embeds one THROTTLED_CHUNK at a time and keeps its Triton busy at most `share` of the time (after a
    chunk that took t s it waits t * (1 / share - 1) s, or until they go quiet): at share 0.01 fewer than about 1%
    of the searches overlap re-embedding, so their p99 is an unshared search's; under searches that never pause
    the reindex runs at `share` of its rate, and still completes. With none about: whole batches, full speed.
    `quiet_s()`: seconds since they were last about (Admission.quiet_for). Where the new model's Triton shares the
    CPU with the service, its embeddings are what slows a search (README "Reindex to new weights")."""

    def __init__(self, quiet_s: Callable[[], float], share: float):
        self.quiet_s, self.share = quiet_s, share
        self._turn = asyncio.Lock()  # throttled chunks one at a time, whichever batch they belong to
        self._next = 0.0  # time.monotonic() before which no throttled chunk starts

    def idle(self) -> bool:
        return self.share >= 1 or self.quiet_s() >= QUIET_S

    async def embed(self, models: Models, data: list[bytes], timeout_s: float) -> list:
        """`models.embed_images_each(data)`, given way to searches as above."""
        out: list = []
        while len(out) < len(data):
            rest = data[len(out):]
            if self.idle():
                out += await models.embed_images_each(rest, timeout_s)
                continue
            async with self._turn:
                while not self.idle() and time.monotonic() < self._next:
                    await asyncio.sleep(POLL_S)
                started = time.monotonic()
                out += await models.embed_images_each(rest[:THROTTLED_CHUNK], timeout_s)
                ended = time.monotonic()
                self._next = ended + (ended - started) * (1 / self.share - 1)
        return out


UNTHROTTLED = Throttle(lambda: float("inf"), 1.0)


class ReindexFailed(CocaError):
    """A reindex that cannot go on as it is; the message says what to fix (then RESUME)."""


class ReindexRunning(CocaError):
    """A reindex call while another one runs (ABORTED; RESUME streams the running one's progress)."""


@dataclass(frozen=True)
class ReindexStatus:
    phase: str  # "embedding", "switching", "done"
    done: int  # items of the generation embedded (this run and earlier ones)
    total: int  # live items
    rate: float  # items per second in this run
    eta_seconds: float
    generation: int
    answered_by: str = ""  # set on "done": the generation searches answer from now


async def fill(engine, target: Generation, models: Models, timeout_s: float,
               report: Callable[[ReindexStatus], None], throttle: Throttle = UNTHROTTLED) -> int:
    """Embed every live item lacking its `target` vector (added meanwhile included); returns how many."""
    done = await asyncio.to_thread(engine.generation_embedded, target.gen)
    started, embedded = time.monotonic(), 0

    def status() -> ReindexStatus:
        total = max(engine.size, done + embedded)
        rate = embedded / max(time.monotonic() - started, 1e-6)
        eta = (total - done - embedded) / rate if rate > 0 else 0.0
        return ReindexStatus("embedding", done + embedded, total, round(rate, 2), round(eta, 1), target.gen)

    report(status())
    inflight: collections.deque[asyncio.Task] = collections.deque()
    after = None  # where the store's walk over its items goes on (its own key: a vid, a Milvus pk)
    try:
        while True:
            batch = BATCH if throttle.idle() else THROTTLED_CHUNK  # (given way: committed a chunk at a time)
            items, after = await asyncio.to_thread(engine.generation_lacking, target.gen, after, batch)
            if items:
                inflight.append(asyncio.create_task(_embed_batch(engine, target, models, items, timeout_s,
                                                                 throttle)))
            while inflight and (len(inflight) >= IN_FLIGHT or not items):
                embedded += await inflight.popleft()
                report(status())
            if not items and not inflight:
                return embedded
    finally:
        for task in inflight:
            task.cancel()


async def _embed_batch(engine, target: Generation, models: Models, items: list, timeout_s: float,
                       throttle: Throttle) -> int:
    items, data = await asyncio.to_thread(_read_all, engine, items)
    vectors = await throttle.embed(models, data, timeout_s)
    for item, vector in zip(items, vectors):
        if isinstance(vector, ModelsUnavailable):
            raise vector
        if isinstance(vector, BaseException):
            raise ReindexFailed(f"item {item.id!r}: the new model's Triton refused its stored image "
                                f"({type(vector).__name__}: {vector}); delete the item, then RESUME")
        if vector.shape != (target.embedding_dim,):
            raise ReindexFailed(f"Triton at {target.triton} returned {vector.size}-value embeddings, but says it "
                                f"serves {target.model} ({target.pretrained}) of dimension {target.embedding_dim}")
    if items:
        await asyncio.to_thread(engine.put_generation, target.gen, items, np.stack(vectors))
    return len(items)


def _read_all(engine, items: list) -> tuple[list, list[bytes]]:
    """The items still there and their bytes (one deleted since it was listed is left out: its blob may be gone)."""
    kept, data = [], []
    for item in items:
        try:
            data.append(engine.read_image(item))
            kept.append(item)
        except BlobError as exc:
            now = engine.get(item.id)
            if now is not None and (now.sha256, now.created_at) == (item.sha256, item.created_at):
                raise ReindexFailed(f"item {item.id!r}: its image cannot be read to embed it again ({exc}); restore "
                                    "the file or delete the item, then RESUME") from None
    return kept, data


async def fill_and_switch(engine, target: Generation, models: Models, timeout_s: float,
                          report: Callable[[ReindexStatus], None],
                          switched: Callable[[Generation], None], throttle: Throttle = UNTHROTTLED) -> Generation:
    """`fill`, then switch the store to `target` (again after another fill while items arrive); `switched` is
    called on the event loop as soon as the store answers from it (the service swaps its models there)."""
    for _ in range(SWITCH_TRIES):
        await fill(engine, target, models, timeout_s, report, throttle)
        total = engine.size
        report(ReindexStatus("switching", total, total, 0.0, 0.0, target.gen))
        serves = await models.identity(timeout_s, fresh=True)  # still those weights (and fresh for the searches next)
        if serves.weights != target.weights:
            raise ReindexFailed(f"Triton at {target.triton} serves {serves} now, not the weights of {target}")
        active = await asyncio.to_thread(engine.switch_generation, target.gen, target.embedding_dim)
        if active is not None:
            switched(active)
            return active
    raise ReindexFailed(f"items kept arriving faster than they were embedded again through {SWITCH_TRIES} switch "
                        "attempts; RESUME when the write rate is lower")


class ReindexJob:
    """The service's one reindex: its task, and the newest status for whoever listens."""

    def __init__(self):
        self.task: Optional[asyncio.Task] = None
        self.latest: Optional[ReindexStatus] = None
        self.what = ""  # what it builds, for the refusal of a second one

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, what: str, work: Callable[[Callable[[ReindexStatus], None]], Awaitable[Generation]]
              ) -> asyncio.Task:
        if self.running:
            raise ReindexRunning(f"a reindex is running ({self.what}); RESUME streams its progress")
        self.latest, self.what = None, what
        self.task = asyncio.ensure_future(work(self._report))
        self.task.add_done_callback(self._log_outcome)  # said in the log even when no client listens any more
        return self.task

    def _log_outcome(self, task: asyncio.Task) -> None:
        if task.cancelled():
            log.warning("reindex stopped (%s); RESUME goes on", self.what)
        elif task.exception() is not None:
            log.error("reindex failed (%s): %s", self.what, task.exception())
        else:
            log.info("reindex done: %s answers", task.result())

    def _report(self, status: ReindexStatus) -> None:
        self.latest = status

    def finished(self, generation: Generation, answered_by: str) -> ReindexStatus:
        last = self.latest or ReindexStatus("done", 0, 0, 0.0, 0.0, generation.gen)
        return replace(last, phase="done", generation=generation.gen, eta_seconds=0.0, answered_by=answered_by)

    def describe(self) -> str:
        """The running reindex and how far it got ("" when none runs)."""
        if not self.running:
            return ""
        latest = self.latest
        return self.what + (f": {latest.phase} {latest.done}/{latest.total} items" if latest else "")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
