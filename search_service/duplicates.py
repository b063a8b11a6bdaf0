"""Near-duplicates: items whose embeddings are almost the same (cosine similarity >= a threshold).

* On add (AddOptions.near_duplicate_threshold): the closest stored item is looked up before the item
  is committed; items of one request are committed one at a time then, so an earlier item of the
  same stream is found too.
* FindDuplicates: each item's `neighbors` nearest other items are the candidate pairs, found exactly: the
  stored embeddings are read a page at a time and compared in blocks (a matrix product, BLOCK_ROWS items
  against all); pairs at or above the threshold join items into groups (connected components). Groups
  come largest first, then by their best pair, then by their first id. One scan makes a snapshot that
  every page of that answer slices (its id is in the page token; SNAPSHOTS_KEPT are kept), so paging never
  scans again and pages are consistent with each other.
Bounds: a scan reads at most `max_items` items (ServiceConfig.max_duplicate_scan; a larger collection is
refused naming the bound), runs on one thread of its own (FindDuplicates calls take turns there; concurrent
calls asking the same question share one scan) so Get/Search/AddImages keep the shared threads, and stops
at the caller's deadline between blocks (DEADLINE_EXCEEDED). Cost: N^2 * D multiply-adds, e.g. ~10 s for
100k 512-d items on 2 cores.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .collection import Collection, Hit
from .query import QueryInputError

LIST_PAGE = 1000


@dataclass(frozen=True)
class Group:
    ids: list[str]  # sorted
    pairs: list[tuple[str, str, float]]  # (a, b, score), a < b, most similar first


def check_threshold(value: float, what: str) -> float:
    if not 0 < value <= 1:
        raise QueryInputError(f"{what} must be a cosine similarity in (0, 1], got {value}")
    return value


def nearest_other(collection: Collection, vector: np.ndarray, sha256: str, consistency: Optional[str] = None
                  ) -> Optional[Hit]:
    """The stored item closest to `vector`, other than the one holding this very content."""
    hits = collection.search(vector, 2, consistency=consistency)
    return next((h for h in hits if h.item.sha256 != sha256), None)


class ScanStopped(Exception):
    """The scan ran past its deadline (or its caller left) between two blocks."""


class TooManyItems(Exception):
    """The collection holds more items than one scan may read."""


BLOCK_ROWS = 512  # items compared against all others at once (BLOCK_ROWS x N scores in memory)


def find_groups(collection: Collection, threshold: float, neighbors: int, max_items: int = 1 << 62,
                keep_going: Callable[[], bool] = lambda: True) -> list[Group]:
    """Groups of items joined by pairs scoring >= threshold among each item's `neighbors` nearest others,
    scanning at most `max_items` items (TooManyItems beyond) and asking `keep_going()` between blocks
    (ScanStopped when it says no)."""
    ids, vectors = _embeddings(collection, max_items, keep_going)
    pairs: dict[tuple[str, str], float] = {}
    for start in range(0, len(ids), BLOCK_ROWS):
        if not keep_going():
            raise ScanStopped(f"stopped after {start} of {len(ids)} items")
        scores = vectors[start:start + BLOCK_ROWS] @ vectors.T
        rows = np.arange(scores.shape[0])
        scores[rows, start + rows] = -np.inf  # never an item with itself
        k = min(neighbors, len(ids) - 1)
        if k < 1:
            break
        nearest = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, columns in enumerate(nearest):
            for column in columns:
                score = float(scores[row, column])
                if score >= threshold:
                    a, b = ids[start + row], ids[column]
                    pairs[(a, b) if a < b else (b, a)] = score
    return _components(pairs)


def _embeddings(collection: Collection, max_items: int, keep_going) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    after = None
    while True:
        if not keep_going():
            raise ScanStopped(f"stopped after reading {len(ids)} items")
        page = collection.list_items(None, None, after, LIST_PAGE, with_embeddings=True)
        if page.total > max_items:
            raise TooManyItems(f"FindDuplicates scans at most {max_items} items, the collection holds "
                               f"{page.total} (raise --max-duplicate-scan, or find them a folder at a time)")
        ids += [item.id for item in page.items]
        blocks += [np.asarray(item.embedding, np.float32) for item in page.items]
        after = page.next_after
        if after is None:
            break
    return ids, (np.stack(blocks) if blocks else np.zeros((0, 0), np.float32))


def _components(pairs: dict[tuple[str, str], float]) -> list[Group]:
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for x in list(parent):
        members.setdefault(root(x), []).append(x)
    joined: dict[str, list[tuple[str, str, float]]] = {}
    for (a, b), score in pairs.items():
        joined.setdefault(root(a), []).append((a, b, score))
    groups = [Group(sorted(ids), sorted(joined[r], key=lambda p: (-p[2], p[0], p[1]))) for r, ids in members.items()]
    return sorted(groups, key=lambda g: (-len(g.ids), -g.pairs[0][2], g.ids[0]))


SNAPSHOTS_KEPT = 4  # FindDuplicates answers kept for paging (each: its groups' ids and pairs)


class DuplicateScans:
    """FindDuplicates' scans: one thread of their own, one scan per question in flight (callers asking the same
    question share it), answers kept as snapshots that later pages slice."""

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="find-duplicates")
        self._snapshots: collections.OrderedDict[str, list[Group]] = collections.OrderedDict()
        self._scanning: dict[tuple, asyncio.Future] = {}
        self._closed = False

    def snapshot(self, snapshot_id: str) -> Optional[list[Group]]:
        return self._snapshots.get(snapshot_id)

    async def scan(self, collection: Collection, threshold: float, neighbors: int, max_items: int,
                   deadline: Optional[float]) -> tuple[str, list[Group]]:
        """(snapshot id, groups) of a fresh scan; ScanStopped at `deadline` (time.monotonic()), TooManyItems."""
        key = (threshold, neighbors, max_items)
        if key not in self._scanning:
            self._scanning[key] = asyncio.ensure_future(self._run(collection, key, deadline))
            self._scanning[key].add_done_callback(lambda _: self._scanning.pop(key, None))
        return await asyncio.shield(self._scanning[key])

    async def _run(self, collection: Collection, key: tuple, deadline: Optional[float]) -> tuple[str, list[Group]]:
        def keep_going() -> bool:
            return not self._closed and (deadline is None or time.monotonic() < deadline)

        groups = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: find_groups(collection, *key, keep_going=keep_going))
        snapshot_id = uuid.uuid4().hex[:16]
        self._snapshots[snapshot_id] = groups
        while len(self._snapshots) > SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)
        return snapshot_id, groups

    def close(self) -> None:
        """Stop a scan at its next block (the service is stopping) and the thread with it."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
