"""Near-duplicates: items whose embeddings are almost the same (cosine similarity >= a threshold).

* On add (AddOptions.near_duplicate_threshold): the closest stored item is looked up before the item
  is committed; items of one request are committed one at a time then, so an earlier item of the
  same stream is found too.
* FindDuplicates: every item's `neighbors` nearest from the index are the candidate pairs; each pair's
  score is the exact inner product of the two stored embeddings (the index's scores are exact: see
  Collection.search); pairs at or above the threshold join items into groups (connected components).
  Groups come largest first, then by their best pair, then by their first id; pages are slices of
  that list, so they are stable while the collection is unchanged (the list is cached per store
  sequence).
Cost: one index search per item (FindDuplicates): seconds per 10k items on a Flat index.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

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


def find_groups(collection: Collection, threshold: float, neighbors: int) -> list[Group]:
    """Groups of items joined by pairs scoring >= threshold among each item's `neighbors` nearest."""
    pairs: dict[tuple[str, str], float] = {}
    after = None
    while True:
        page = collection.list_items(None, None, after, LIST_PAGE, with_embeddings=True, consistency="Strong")
        for item in page.items:
            for hit in collection.search(item.embedding, neighbors + 1, min_score=threshold, consistency="Strong"):
                if hit.item.id != item.id:
                    pairs[tuple(sorted((item.id, hit.item.id)))] = hit.score
        after = page.next_after
        if after is None:
            break
    return _components(pairs)


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


class GroupCache:
    """The last FindDuplicates answer, per (threshold, neighbors, store sequence): pages slice one list."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: Optional[tuple] = None
        self._groups: list[Group] = []

    def groups(self, collection: Collection, threshold: float, neighbors: int, sequence: int) -> list[Group]:
        key = (threshold, neighbors, sequence)
        with self._lock:
            if key != self._key:
                self._groups, self._key = find_groups(collection, threshold, neighbors), key
            return self._groups
