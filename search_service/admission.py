"""Load shedding: bounds on the work in flight, answered at once with RESOURCE_EXHAUSTED past them.

Requests come in three classes, each with a budget of its own, so one kind cannot crowd out another:

* search:  SearchText, SearchImage, Classify, Rank, Get, Delete, Stats, List, FindDuplicates (what users wait on)
* ingest:  AddImages streams (held for the stream's life)
* caption: Caption, CaptionStream (seconds each: a decoder sequence runs token by token; a stream holds its
  slot until its last message, or until its caller cancels it)

and one bound on decoder sequences in flight, shared by Caption calls and streams (one each), by the
retry job of ingest captions (one at a time), and by searches
`with_captions` (one per hit being captioned). A search that finds no sequence free is still
answered: the hits it could not caption say so in `caption_error`. So captioning is shed first and
searches keep their budget whatever the captions do.

A request past its bound is refused at once, never queued: a queue in front of a saturated service
only makes every caller wait until its deadline (clip-retrieval #262). Optionally each bearer token
(each client address when the service has no token) gets a token bucket of `rate` requests/s.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

SEARCH, INGEST, CAPTION = "search", "ingest", "caption"
CLASSES = (SEARCH, INGEST, CAPTION)
CLASS_OF_METHOD = {"AddImages": INGEST, "Caption": CAPTION, "CaptionStream": CAPTION}  # every other method of the service: SEARCH
CAPTION_SEQUENCES = "caption_sequences"
RATE = "rate"
MAX_BUCKETS = 10_000  # rate-limit buckets kept (least recently used out first): memory stays bounded


def request_class(method: str) -> str:
    return CLASS_OF_METHOD.get(method, SEARCH)


@dataclass(frozen=True)
class Limits:
    """Bounds on work in flight (0: no bound) and the optional per-token rate limit (0: off)."""

    search: int = 32  # a search takes ~10-50 ms on 2 cores: 32 at once finish within about a second
    ingest: int = 8  # AddImages streams (each embeds a batch of up to add_batch images at a time)
    caption: int = 8  # Caption calls and CaptionStream streams
    caption_sequences: int = 16  # decoder sequences (Caption + searches with_captions): one batched decoder step
    rate: float = 0.0  # requests per second per bearer token (per client address without a token)
    burst: int = 0  # bucket size: requests a token may send at once; 0: max(1, rate)

    def __post_init__(self):
        for name in ("search", "ingest", "caption", "caption_sequences", "burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"limit {name} must be >= 0 (0: no bound), got {getattr(self, name)}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate limit must be a finite number >= 0 of requests/s (0: off), got {self.rate}")

    def bound(self, kind: str) -> int:
        return getattr(self, kind)


class Shed(Exception):
    """Refused by load shedding (RESOURCE_EXHAUSTED); `bound` names the limit that was reached."""

    def __init__(self, bound: str, message: str):
        super().__init__(message)
        self.bound = bound


FLAGS = {SEARCH: "--max-inflight-search", INGEST: "--max-inflight-ingest", CAPTION: "--max-inflight-caption",
         CAPTION_SEQUENCES: "--max-caption-sequences", RATE: "--rate-limit"}


class Admission:
    """Counts what is in flight per class and refuses what is past a bound. Used from the event loop
    and from threads (the metrics scrape), so counts change under a lock."""

    def __init__(self, limits: Limits, on_shed: Optional[Callable[[str], None]] = None):
        self.limits = limits
        self._on_shed = on_shed or (lambda bound: None)
        self._lock = threading.Lock()
        self._inflight = {kind: 0 for kind in (*CLASSES, CAPTION_SEQUENCES)}
        self._buckets = _TokenBuckets(limits.rate, limits.burst or max(1, int(limits.rate))) if limits.rate else None

    def inflight(self, kind: str) -> int:
        return self._inflight[kind]

    @contextlib.contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        """One unit of `kind` (a request class, or CAPTION_SEQUENCES) for the block; Shed when none is free."""
        bound = self.limits.bound(kind)
        with self._lock:
            full = bound and self._inflight[kind] >= bound
            if not full:
                self._inflight[kind] += 1
        if full:
            self._on_shed(kind)
            what = "caption sequences" if kind == CAPTION_SEQUENCES else f"{kind} requests"
            raise Shed(kind, f"overloaded: {bound} {what} in flight, the bound ({FLAGS[kind]}); retry later")
        try:
            yield
        finally:
            with self._lock:
                self._inflight[kind] -= 1

    def check_rate(self, who: str) -> None:
        """Shed when `who` (a token, or a client address) has spent its bucket."""
        if self._buckets is None:
            return
        wait = self._buckets.take(who)
        if wait > 0:
            self._on_shed(RATE)
            raise Shed(RATE, f"rate limit: {self.limits.rate:g} requests/s per token (burst "
                             f"{self._buckets.burst}, {FLAGS[RATE]}); retry in {wait:.2f} s")


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
