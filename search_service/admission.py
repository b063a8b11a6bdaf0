"""Load shedding: bounds on the work in flight, a short bounded wait for a slot, then RESOURCE_EXHAUSTED
with a retry hint.

Requests come in three classes, each with a budget of its own, so one kind cannot crowd out another:

* search:  SearchText, SearchImage, Classify, Rank, Get, Delete, Stats, List, FindDuplicates (what users wait on)
* ingest:  AddImages streams (held for the stream's life)
* caption: Caption, CaptionStream (seconds each: a decoder sequence runs token by token; a stream holds its
  slot until its last message, or until its caller cancels it)

(Backup and Reindex take no slot: one of each per store runs at a time, on a thread or task of its own; a
reindex gives way to searches and captions by itself, search_service/reindex.py Throttle, which must not
count its own progress stream as a search.) And one bound on decoder sequences in flight, shared by Caption calls and streams (one each), by the
retry job of ingest captions (one at a time), and by searches
`with_captions` (one per hit being captioned). A search that finds no sequence free is still
answered: the hits it could not caption say so in `caption_error`. So captioning is shed first and
searches keep their budget whatever the captions do.

The caption bounds default to the decoder's capacity (`capacity_rows` of the decoder's model config, the
KV-cache rows it holds at once), summed over the Triton endpoints in rotation, and read again whenever
they change (an endpoint in or out, a restarted server, another export): shedding below what the decoders
were built for would be an outage, admitting past it a CapacityError without a hint. A decoder sequence
counts its rows (`num_beams`: a beam search holds one row per beam); one larger than the whole bound takes
all of it (the decoder then says whether it fits at all).

A request past its class's bound waits for a slot in a queue as long as the bound (as many waiting as
running), at most `queue_wait_s` and half the time to its deadline; one that finds the queue full, or
whose wait runs out, is refused with RESOURCE_EXHAUSTED (a decoder sequence with no rows free: at once).
A bounded wait absorbs bursts; it is no queue in front of a saturated service, which would only make every
caller wait until its deadline (clip-retrieval #262). A refusal carries a retry hint, trailing metadata
`retry-after-ms` (RETRY_AFTER_KEY): about when a slot frees (the recent hold time of the class's slots, or
of decoder sequences), or when the rate limit's bucket has a token. Clients (coca_client, clients/node) retry only a RESOURCE_EXHAUSTED that has it
(a message over the size limit has none: asking again cannot help). Optionally each bearer token
(each client address when the service has no token) gets a token bucket of `rate` requests/s.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional

SEARCH, INGEST, CAPTION = "search", "ingest", "caption"
CLASSES = (SEARCH, INGEST, CAPTION)
CLASS_OF_METHOD = {"AddImages": INGEST, "AddVideos": INGEST, "Caption": CAPTION, "CaptionStream": CAPTION}  # every other method of the service: SEARCH
# Methods that take no slot: bounded by a rule of their own (Backup, Reindex: one per store at a time, on a thread
# or task of its own), so minutes of work never hold a slot that searches wait for. The rate limit still applies.
UNCOUNTED_METHODS = frozenset({"Backup", "Reindex"})
CAPTION_SEQUENCES = "caption_sequences"
RATE = "rate"
DECODER_SIZED = (CAPTION, CAPTION_SEQUENCES)  # bounds that default to the decoder's capacity
MAX_BUCKETS = 10_000  # rate-limit buckets kept (least recently used out first): memory stays bounded
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a shed call: milliseconds after which to ask again
RETRY_AFTER_S = (0.05, 5.0)  # the hint's range: never "at once" (a stampede), never longer than a caller would wait
HOLD_EWMA = 0.2  # weight of the newest hold time in a class's running mean (the retry hint's base)


def request_class(method: str) -> Optional[str]:
    """The class whose slot a call of `method` holds; None for UNCOUNTED_METHODS."""
    if method in UNCOUNTED_METHODS:
        return None
    return CLASS_OF_METHOD.get(method, SEARCH)


@dataclass(frozen=True)
class Limits:
    """Bounds on work in flight (0: no bound; None: the decoder's capacity, once Triton has said it), the
    longest wait for a slot, and the optional per-token rate limit (0: off)."""

    search: int = 32  # a search takes ~10-50 ms on 2 cores: 32 at once finish within about a second
    ingest: int = 8  # AddImages streams (each embeds a batch of up to add_batch images at a time)
    caption: Optional[int] = None  # Caption calls and CaptionStream streams: the decoder's capacity
    caption_sequences: Optional[int] = None  # decoder rows (num_beams per Caption, hit captioned): its capacity
    queue_wait_s: float = 5.0  # longest wait for a slot (past a class's bound; 0: refuse at once)
    rate: float = 0.0  # requests per second per bearer token (per client address without a token)
    burst: int = 0  # bucket size: requests a token may send at once; 0: max(1, rate)

    def __post_init__(self):
        for name in ("search", "ingest", "caption", "caption_sequences", "burst"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"limit {name} must be >= 0 (0: no bound), got {value}")
        for name, what in (("rate", "rate limit must be a finite number >= 0 of requests/s (0: off)"),
                           ("queue_wait_s", "queue wait must be a finite number >= 0 of seconds (0: refuse at once)")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{what}, got {value}")


class Shed(Exception):
    """Refused by load shedding (RESOURCE_EXHAUSTED); `bound` names the limit that was reached,
    `retry_after_s` when asking again may be admitted."""

    def __init__(self, bound: str, message: str, retry_after_s: float = RETRY_AFTER_S[0]):
        super().__init__(message)
        self.bound = bound
        self.retry_after_s = min(max(retry_after_s, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_KEY, str(round(self.retry_after_s * 1000))),)


def retry_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The retry hint to send with the status of `exc` (none unless it was shed)."""
    return exc.trailing_metadata() if isinstance(exc, Shed) else ()


FLAGS = {SEARCH: "--max-inflight-search", INGEST: "--max-inflight-ingest", CAPTION: "--max-inflight-caption",
         CAPTION_SEQUENCES: "--max-caption-sequences", RATE: "--rate-limit"}


class Admission:
    """Counts what is in flight per class, lets a request past the bound wait a while for a slot, and
    refuses the rest. Waiting and handing over slots happen on the event loop; counts change under a
    lock, since the metrics scrape reads them from its thread."""

    def __init__(self, limits: Limits, on_shed: Optional[Callable[[str], None]] = None):
        self.limits = limits
        self._on_shed = on_shed or (lambda bound: None)
        self._lock = threading.Lock()
        self._inflight = {kind: 0 for kind in (*CLASSES, CAPTION_SEQUENCES)}
        self._waiting: dict[str, deque[asyncio.Future]] = {kind: deque() for kind in CLASSES}
        self._hold_s = {kind: 0.0 for kind in (*CLASSES, CAPTION_SEQUENCES)}  # running mean of a slot's hold time
        self._last_release = {kind: float("-inf") for kind in (*CLASSES, CAPTION_SEQUENCES)}  # time.monotonic()
        self._decoder_capacity: Optional[int] = None
        self._capacity_source: object = None  # what the capacity was read from (Models.capacity_source)
        self._buckets = _TokenBuckets(limits.rate, limits.burst or max(1, int(limits.rate))) if limits.rate else None

    # ------------------------------------------------------------ bounds
    def bound(self, kind: str) -> int:
        """The bound of `kind` now (0: none): a decoder-sized one is unbounded until the capacity is known."""
        value = getattr(self.limits, kind)
        if value is None:
            return self._decoder_capacity or 0
        return value

    def capacity_outdated(self, source: object) -> bool:
        """Whether a decoder-sized bound needs the capacity read (again): unknown yet, or read from other
        endpoints than `source` (the endpoints in rotation now, their connections and identity)."""
        sized = any(getattr(self.limits, k) is None for k in DECODER_SIZED)
        return sized and (self._decoder_capacity is None or source != self._capacity_source)

    def set_decoder_capacity(self, rows: int, source: object = None) -> None:
        """The KV-cache rows the decoders hold at once (capacity_rows, summed over the endpoints in rotation),
        as read from `source`."""
        if rows < 1:
            raise ValueError(f"the decoder's capacity must be >= 1 row, got {rows}")
        self._decoder_capacity, self._capacity_source = rows, source

    def inflight(self, kind: str) -> int:
        return self._inflight[kind]

    def waiting(self, kind: str) -> int:
        return len(self._waiting[kind]) if kind in self._waiting else 0

    def quiet_for(self, kinds: tuple[str, ...]) -> float:
        """Seconds since the last request of `kinds` finished; 0 while one is in flight or waiting."""
        if any(self._inflight[kind] or self.waiting(kind) for kind in kinds):
            return 0.0
        return time.monotonic() - max(self._last_release[kind] for kind in kinds)

    # ------------------------------------------------------------ slots
    @contextlib.contextmanager
    def hold(self, kind: str, units: int = 1) -> Iterator[None]:
        """`units` of `kind` for the block, taken now or never (Shed): a decoder sequence's rows (num_beams),
        and tests. More units than the bound take all of it."""
        bound = self.bound(kind)
        units = min(units, bound) if bound else units
        if not self._take(kind, units):
            self._shed(kind)
        started = time.monotonic()
        try:
            yield
        finally:
            self._held(kind, started)
            self._release(kind, units)

    @contextlib.asynccontextmanager
    async def admitted(self, kind: str, time_left: Optional[float] = None) -> AsyncIterator[None]:
        """A slot of request class `kind` for the block: at once, or after a wait in the class's queue
        (as long as its bound) of at most queue_wait_s and half of `time_left` (to the caller's deadline); Shed else."""
        if not self._take(kind):
            await self._wait_for_slot(kind, time_left)
        started = time.monotonic()
        try:
            yield
        finally:
            self._held(kind, started)
            self._release(kind)

    def _held(self, kind: str, since: float) -> None:
        self._hold_s[kind] += HOLD_EWMA * (time.monotonic() - since - self._hold_s[kind])

    def _take(self, kind: str, units: int = 1) -> bool:
        bound = self.bound(kind)
        with self._lock:
            if bound and (self._inflight[kind] + units > bound or self.waiting(kind)):  # no overtaking those waiting
                return False
            self._inflight[kind] += units
            return True

    async def _wait_for_slot(self, kind: str, time_left: Optional[float]) -> None:
        # at most half the caller's time left: once admitted, the work needs time too (else the caller would
        # see DEADLINE_EXCEEDED, not the refusal and its hint)
        wait = self.limits.queue_wait_s if time_left is None else min(self.limits.queue_wait_s, time_left / 2)
        queue = self._waiting[kind]
        if wait <= 0 or len(queue) >= self.bound(kind):
            self._shed(kind)
        slot = asyncio.get_running_loop().create_future()  # resolved by _release: its slot is handed over
        queue.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), wait)
        except asyncio.TimeoutError:
            if not slot.done():  # (a slot handed over at the last moment is taken, not wasted)
                queue.remove(slot)
                slot.cancel()
                self._shed(kind)
        except BaseException:  # the caller went away while waiting
            if slot.done():
                self._release(kind)
            else:
                queue.remove(slot)
                slot.cancel()
            raise

    def _release(self, kind: str, units: int = 1) -> None:
        queue = self._waiting.get(kind)  # (only request classes queue, one unit each)
        with self._lock:
            while queue:
                slot = queue.popleft()
                if not slot.done():
                    slot.set_result(None)  # the slot goes to the longest waiting, the count stays
                    return
            self._inflight[kind] -= units
            self._last_release[kind] = time.monotonic()

    def _shed(self, kind: str) -> None:
        self._on_shed(kind)
        bound = self.bound(kind)
        if kind == CAPTION_SEQUENCES:
            raise Shed(kind, f"overloaded: {self._inflight[kind]} of {bound} decoder rows in flight, the bound "
                             f"({FLAGS[kind]}); retry later", self._retry_after(kind))
        raise Shed(kind, f"overloaded: {bound} {kind} requests in flight, the bound ({FLAGS[kind]}), and "
                         f"{self.waiting(kind)} waiting; retry later", self._retry_after(kind))

    def _retry_after(self, kind: str) -> float:
        """About when a slot will be free for one more: the requests ahead of it, each holding its slot
        for the class's mean hold time, `bound` at a time."""
        ahead = self._inflight[kind] + self.waiting(kind)
        return self._hold_s[kind] * ahead / max(1, self.bound(kind))

    def check_rate(self, who: str) -> None:
        """Shed when `who` (a token, or a client address) has spent its bucket."""
        if self._buckets is None:
            return
        wait = self._buckets.take(who)
        if wait > 0:
            self._on_shed(RATE)
            raise Shed(RATE, f"rate limit: {self.limits.rate:g} requests/s per token (burst "
                             f"{self._buckets.burst}, {FLAGS[RATE]}); retry in {wait:.2f} s", wait)


class _TokenBuckets:
    """A token bucket per caller: `rate` tokens/s up to `burst`; a request takes one."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._lock = threading.Lock()
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, who: str) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        key = hashlib.sha256(who.encode()).digest()  # never keep the bearer token itself
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            taken = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if taken else tokens, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        return 0.0 if taken else (1.0 - tokens) / self.rate
