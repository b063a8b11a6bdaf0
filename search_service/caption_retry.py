"""Captions on ingest that failed, tried again later by a background job.

AddImages with AddOptions.caption stores the item even when its caption fails (Triton busy or
down, a decoder error): the result says why, and the item goes into a retry book. The job
(CaptionRetryJob, one per service process) takes the items that are due, oldest first, one at a
time and at most `rate` per second, and captions each through the same path as every caption
(a decoder sequence under --max-caption-sequences). A try that fails waits twice as long as the
one before (from `first_wait_s`, at most `max_wait_s`); after `retries` failed retries the item
is given up (a with_captions search or a Caption of the id still makes its caption). Not counted
as a try: Triton unreachable or serving other weights, the store unreachable (the job pauses until
they answer), no decoder sequence free here or in Triton's cache (the job waits its turn), since
none of these says anything about the item.

Where the book lives is the store's business (Collection.retry_book): the embedded store keeps it
in SQLite beside the items (table caption_retry), so what still lacks a caption after a restart
is found again; a store without a durable book keeps it in memory (MemoryRetryBook).
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

log = logging.getLogger("search_service.caption_retry")

MAX_DUE = 64  # entries read per look at the book
MAX_POLL_S = 1.0  # how often the job looks for due entries (at most)


@dataclass(frozen=True)
class CaptionRetry:
    """One item waiting for another try."""

    item_id: str
    retries: int  # retries already failed (the ingest's own try not counted)
    next_at: float  # wall-clock time (time.time()) of the next try
    error: str  # why the last try failed


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # retries after the ingest's failed try; 0: none (the job is off)
    first_wait_s: float = 10.0  # before the first retry; doubled after each failure
    max_wait_s: float = 3600.0
    rate: float = 2.0  # retries started per second, at most

    def __post_init__(self):
        if self.retries < 0:
            raise ValueError(f"caption retries must be >= 0 (0: off), got {self.retries}")
        for name in ("first_wait_s", "max_wait_s", "rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"caption retry {name} must be a finite number > 0, got {value}")

    def wait_after(self, failed_retries: int) -> float:
        """Seconds before the next try, after the ingest's try and `failed_retries` retries failed."""
        return min(self.max_wait_s, self.first_wait_s * 2 ** min(failed_retries, 30))


class RetryBook:
    """Items waiting for a caption retry. Methods block (asyncio callers use asyncio.to_thread)."""

    durable = False  # survives a restart of the service

    def add(self, failures: dict[str, str], next_at: float) -> None:
        """Items (id -> why the caption failed) to try again at `next_at`."""
        raise NotImplementedError

    def due(self, now: float, limit: int) -> list[CaptionRetry]:
        """Up to `limit` entries due at `now` (not given up), the longest waiting first."""
        raise NotImplementedError

    def failed(self, item_id: str, retries: int, error: str, next_at: Optional[float]) -> None:
        """A retry failed: `retries` have now failed; try again at `next_at`, or never (None: given up)."""
        raise NotImplementedError

    def done(self, item_id: str) -> None:
        """The item has its caption (or is gone): forget it."""
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        """(pending, given up)."""
        raise NotImplementedError


class MemoryRetryBook(RetryBook):
    """The book in this process's memory: lost when the service restarts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, CaptionRetry] = {}
        self._given_up: set[str] = set()

    def add(self, failures: dict[str, str], next_at: float) -> None:
        with self._lock:
            for item_id, error in failures.items():
                self._entries[item_id] = CaptionRetry(item_id, 0, next_at, error)
                self._given_up.discard(item_id)

    def due(self, now: float, limit: int) -> list[CaptionRetry]:
        with self._lock:
            ready = sorted((e for e in self._entries.values() if e.next_at <= now), key=lambda e: e.next_at)
        return ready[:limit]

    def failed(self, item_id: str, retries: int, error: str, next_at: Optional[float]) -> None:
        with self._lock:
            if item_id not in self._entries:
                return
            if next_at is None:
                del self._entries[item_id]
                self._given_up.add(item_id)
            else:
                self._entries[item_id] = CaptionRetry(item_id, retries, next_at, error)

    def done(self, item_id: str) -> None:
        with self._lock:
            self._entries.pop(item_id, None)
            self._given_up.discard(item_id)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), len(self._given_up)


class Paused(Exception):
    """The job cannot try now (Triton unreachable, no decoder sequence free): no try is counted."""


class CaptionRetryJob:
    """The background job: `caption_item(item_id)` makes and stores an item's caption, returning False
    when the item no longer needs one (deleted, or captioned meanwhile); it raises Paused when the
    try did not happen, any other exception when it failed."""

    def __init__(self, book: RetryBook, policy: RetryPolicy, caption_item: Callable[[str], Awaitable[bool]]):
        self.book = book
        self.policy = policy
        self.caption_item = caption_item
        self.retried_ok = 0  # since this process started

    def record_failures(self, failures: dict[str, str]) -> None:
        """Ingest captions that failed (id -> why): tried again after policy.first_wait_s. Blocks."""
        if failures and self.policy.retries:
            self.book.add(failures, time.time() + self.policy.wait_after(0))

    async def run(self) -> None:
        """Try what is due, one at a time, at most policy.rate a second, until cancelled."""
        pause = min(MAX_POLL_S, self.policy.first_wait_s / 2)
        while True:
            try:
                due = await asyncio.to_thread(self.book.due, time.time(), MAX_DUE)
                for entry in due:
                    await self._try(entry)
                    await asyncio.sleep(1 / self.policy.rate)
            except asyncio.CancelledError:
                raise
            except Paused as exc:
                log.info("caption retries wait: %s", exc)
            except Exception:  # the book cannot be read (the store is down): look again later
                log.exception("caption retry job")
            await asyncio.sleep(pause)

    async def _try(self, entry: CaptionRetry) -> None:
        try:
            needed = await self.caption_item(entry.item_id)
        except Paused:
            raise  # not this item's fault: the round ends, its entries stay due
        except Exception as exc:
            retries = entry.retries + 1
            give_up = retries >= self.policy.retries
            next_at = None if give_up else time.time() + self.policy.wait_after(retries)
            await asyncio.to_thread(self.book.failed, entry.item_id, retries, str(exc) or type(exc).__name__, next_at)
            log.info("caption retry %d of %s failed (%s)%s", retries, entry.item_id, exc,
                     ": given up" if give_up else "")
            return
        await asyncio.to_thread(self.book.done, entry.item_id)
        self.retried_ok += needed

    def stats(self) -> dict:
        """The StatsResponse fields. Blocks."""
        pending, given_up = self.book.counts()
        return {"captions_pending_retry": pending, "captions_retried_ok": self.retried_ok,
                "captions_given_up": given_up}
