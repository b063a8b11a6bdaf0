"""Metadata filters in memory: (key, value) -> the vids that carry it, derived from the store.

A filter is a dict of key = value terms, all of which must hold. SQLite keeps the
truth (`item_meta`); this module keeps posting lists as numpy arrays so a filter
matching half of a million items resolves in about a millisecond instead of
pulling half a million rows through SQL. Vids only grow, so appending keeps
every list sorted. A delete only clears the vid's live bit; lists are compacted
when dead entries pass half of them.

Writes come from the engine's one writer thread; reads from any thread. Readers
take a consistent copy of what they need under a short lock.
"""
from __future__ import annotations

import threading
from typing import Iterable

import numpy as np


class _Postings:
    """A growable, sorted int64 array."""

    __slots__ = ("data", "size")

    def __init__(self):
        self.data = np.empty(8, np.int64)
        self.size = 0

    def append(self, vid: int) -> None:
        if self.size == len(self.data):
            grown = np.empty(2 * len(self.data), np.int64)
            grown[:self.size] = self.data
            self.data = grown
        self.data[self.size] = vid
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[:self.size]


class MetadataIndex:
    """Which live items carry each metadata (key, value)."""

    def __init__(self):
        self._lists: dict[tuple[str, str], _Postings] = {}
        self._live = np.zeros(1024, np.bool_)
        self._entries = 0  # postings, dead ones included
        self._dead = 0
        self._lock = threading.Lock()

    def load(self, rows: Iterable[tuple[int, str, str]]) -> None:
        """Fill from (vid, key, value) rows in vid order (the store's item_meta), replacing the contents."""
        with self._lock:
            self._lists, self._entries, self._dead = {}, 0, 0
            self._live = np.zeros(1024, np.bool_)
            for vid, key, value in rows:
                self._append(vid, key, value)

    def add(self, vid: int, metadata: dict[str, str]) -> None:
        with self._lock:
            for key, value in metadata.items():
                self._append(vid, key, value)

    def remove(self, vid: int, metadata: dict[str, str]) -> None:
        with self._lock:
            if vid < len(self._live) and self._live[vid]:
                self._live[vid] = False
                self._dead += len(metadata)
            if self._dead > 1024 and 2 * self._dead > self._entries:
                self._compact()

    def matching(self, filters: dict[str, str]) -> np.ndarray:
        """The live vids carrying every key = value of `filters`, sorted."""
        with self._lock:
            lists = [self._lists.get((key, value)) for key, value in filters.items()]
            if any(p is None for p in lists):
                return np.zeros(0, np.int64)
            views = sorted((p.view() for p in lists), key=len)
            live = self._live
            result = views[0][live[views[0]]]  # a fancy index copies: safe after the lock
        for other in views[1:]:
            if not len(result):
                break
            member = np.zeros(int(max(result[-1], other[-1] if len(other) else 0)) + 1, np.bool_)
            member[other] = True
            result = result[member[result]]
        return result

    # ------------------------------------------------------------ internals (lock held)
    def _append(self, vid: int, key: str, value: str) -> None:
        postings = self._lists.get((key, value))
        if postings is None:
            postings = self._lists[(key, value)] = _Postings()
        postings.append(vid)
        self._entries += 1
        self._mark(vid)

    def _mark(self, vid: int) -> None:
        if vid >= len(self._live):
            grown = np.zeros(max(2 * len(self._live), vid + 1), np.bool_)
            grown[:len(self._live)] = self._live
            self._live = grown
        self._live[vid] = True

    def _compact(self) -> None:
        lists: dict[tuple[str, str], _Postings] = {}
        for term, postings in self._lists.items():
            kept = postings.view()[self._live[postings.view()]]
            if len(kept):
                fresh = _Postings()
                fresh.data, fresh.size = kept.copy(), len(kept)
                lists[term] = fresh
        self._lists = lists
        self._entries = sum(p.size for p in lists.values())
        self._dead = 0
