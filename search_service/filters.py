"""Filters and orders in memory, derived from the store: which live items pass a `Filter`, in what order.

SQLite keeps the truth (`items`, `item_meta`); this module keeps, per vid:
  * a live bit (every stored item, with or without metadata);
  * posting lists (key, value) -> vids as growable sorted numpy arrays (equality, any-of);
  * one float64 column per typed field (`added_at`, and the schema's number/date fields; NaN where
    an item has no parseable value), for ranges and orders.
So a filter matching half of a million items resolves in milliseconds instead of pulling half a
million rows through SQL. Each condition becomes a boolean mask over vids; the masks are AND-ed
with the live bits. Vids only grow, so appending keeps every posting list sorted. A delete clears
the live bit; posting lists are compacted when dead entries pass half of them.

Writes come from the engine's one writer thread; reads from any thread. Readers build what they
need under a short lock.
"""
from __future__ import annotations

import threading
from typing import Iterable, Optional

import numpy as np

from .query import ADDED_AT, Condition, Filter, Order, Schema


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
    """Which live items carry each metadata (key, value), and their typed values."""

    def __init__(self, schema: Schema = Schema()):
        self.schema = schema
        self._reset()
        self._lock = threading.Lock()

    def _reset(self) -> None:
        self._lists: dict[tuple[str, str], _Postings] = {}
        self._live = np.zeros(1024, np.bool_)
        self._columns = {name: np.full(1024, np.nan) for name in [ADDED_AT, *self.schema.typed_fields]}
        self._entries = 0  # postings, dead ones included
        self._dead = 0

    def load(self, items: Iterable[tuple[int, float]], metadata: Iterable[tuple[int, str, str]]) -> None:
        """Fill from (vid, added_at) of every item and (vid, key, value) of their metadata, both in vid
        order (the store's `items` and `item_meta`), replacing the contents."""
        with self._lock:
            self._reset()
            for vid, added_at in items:
                self._mark(vid, added_at)
            for vid, key, value in metadata:
                self._append(vid, key, value)

    def add(self, vid: int, metadata: dict[str, str], added_at: float) -> None:
        with self._lock:
            self._mark(vid, added_at)
            for key, value in metadata.items():
                self._append(vid, key, value)

    def remove(self, vid: int, metadata: dict[str, str]) -> None:
        with self._lock:
            if vid < len(self._live) and self._live[vid]:
                self._live[vid] = False
                self._dead += len(metadata)
            if self._dead > 1024 and 2 * self._dead > self._entries:
                self._compact()

    # ------------------------------------------------------------ reads
    def matching(self, flt: Filter | dict[str, str]) -> np.ndarray:
        """The live vids that pass every condition of `flt` (or carry every key = value of a dict), sorted."""
        flt = Filter.of(flt) or Filter()
        with self._lock:
            mask = self._live.copy()  # a copy: safe after the lock
            for condition in flt.conditions:
                passed = self._passing(condition, len(mask))
                mask &= ~passed if condition.negate else passed
        return np.flatnonzero(mask)

    def live(self) -> np.ndarray:
        """Every live vid, sorted."""
        with self._lock:
            return np.flatnonzero(self._live)

    def ordered(self, vids: np.ndarray, order: Optional[Order], after: Optional[list] = None) -> np.ndarray:
        """`vids` (sorted) in `order` (None: vid order), starting after the position `after` (from
        `positions`). Items without the field come last in either direction; ties by vid."""
        if order is None:
            return vids[vids > after[0]] if after else vids
        values, missing = self._values(vids, order.field)
        keys = np.where(missing, 0.0, -values if order.descending else values)
        if after:
            value, vid = after
            missing_after = value is None
            key_after = 0.0 if missing_after else (-value if order.descending else value)
            later = (missing > missing_after) | ((missing == missing_after) & (
                (keys > key_after) | ((keys == key_after) & (vids > vid))))
            vids, keys, missing = vids[later], keys[later], missing[later]
        return vids[np.lexsort((vids, keys, missing))]

    def positions(self, vids: np.ndarray, order: Optional[Order]) -> list[list]:
        """Where each of `vids` sits in `order`, as `ordered`'s `after` takes it (JSON-able: None for a
        missing value)."""
        if order is None:
            return [[vid] for vid in vids.tolist()]
        values, missing = self._values(vids, order.field)
        return [[None if gone else value, vid] for value, gone, vid in zip(values.tolist(), missing.tolist(), vids.tolist())]

    def _values(self, vids: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            column = self._columns[name]
            inside = vids < len(column)
            values = np.full(len(vids), np.nan)
            values[inside] = column[vids[inside]]
        return values, np.isnan(values)

    # ------------------------------------------------------------ internals (lock held)
    def _passing(self, condition: Condition, size: int) -> np.ndarray:
        """The vids in [0, size) that pass the test of `condition` (before negation), as a mask."""
        if condition.is_range:
            column = self._columns[condition.field][:size]
            passed = np.ones(size, np.bool_)
            if condition.low is not None:
                passed &= (column > condition.low) if condition.low_open else (column >= condition.low)
            if condition.high is not None:
                passed &= (column < condition.high) if condition.high_open else (column <= condition.high)
            return passed & ~np.isnan(column)
        passed = np.zeros(size, np.bool_)
        for value in condition.values:
            postings = self._lists.get((condition.field, value))
            if postings is not None:
                passed[postings.view()] = True
        return passed

    def _append(self, vid: int, key: str, value: str) -> None:
        postings = self._lists.get((key, value))
        if postings is None:
            postings = self._lists[(key, value)] = _Postings()
        postings.append(vid)
        self._entries += 1
        if key in self._columns and key != ADDED_AT:
            typed = self.schema.typed_value(key, value)
            self._columns[key][vid] = np.nan if typed is None else typed

    def _mark(self, vid: int, added_at: float) -> None:
        if vid >= len(self._live):
            size = max(2 * len(self._live), vid + 1)
            self._live = _grown(self._live, size, False)
            self._columns = {name: _grown(column, size, np.nan) for name, column in self._columns.items()}
        self._live[vid] = True
        self._columns[ADDED_AT][vid] = added_at

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


def _grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    grown = np.full(size, fill, array.dtype)
    grown[:len(array)] = array
    return grown
