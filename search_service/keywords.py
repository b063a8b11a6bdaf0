"""KEYWORD search's index: BM25 over each item's caption and text fields, in memory, derived from the store.

The store (SQLite) holds the truth: captions and metadata. Like the filter index (filters.py), this index is
built from it when the collection opens and then follows every committed write on the writer thread, so it never
runs ahead of the store. Reads (search) run on any thread under one lock.

Why not SQLite FTS5 (store schema 2 kept one over captions): FTS5 computes bm25() row by row for every row that
matches any word of the query, ~10-25 us each; a query like "a photo of a red dog in a park" matches most of
a collection, and `coca bench search --mode keyword` measured a p50 of 1051 ms at 100k items (41x the vector
search's). Here a word's postings are numpy arrays and a query scores them all at once (README, Performance).

Scores are FTS5's bm25() (k1 1.2, b 0.75, idf log((N - n + 0.5) / (n + 0.5)) floored at 1e-6, a document's
length against the average), positive: higher is better. A document is the caption and the values of the text
fields, in field-name order; only items with some text are documents (N counts them). Words: runs of letters and
digits, lowercased.
"""
from __future__ import annotations

import heapq
import math
import re
import threading
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

K1, B = 1.2, 0.75
IDF_FLOOR = 1e-6
WORD = re.compile(r"[^\W_]+")  # letters and digits (str.isalnum's), not the underscore


def words(text: str) -> list[str]:
    """The words of `text`: runs of letters and digits, lowercased."""
    return WORD.findall(text.lower())


def query_terms(text: str) -> list[str]:
    """The distinct words of a keyword query, in order."""
    return list(dict.fromkeys(words(text)))


class _Postings:
    """The items holding one word and how often: settled numpy arrays plus the changes since (adds in lists,
    removals in a set), merged when a query reads them."""

    __slots__ = ("vids", "counts", "new_vids", "new_counts", "gone")

    def __init__(self, vids: Optional[np.ndarray] = None, counts: Optional[np.ndarray] = None):
        self.vids = np.zeros(0, np.int64) if vids is None else vids
        self.counts = np.zeros(0, np.float64) if counts is None else counts
        self.new_vids: list[int] = []
        self.new_counts: list[int] = []
        self.gone: set[int] = set()

    def __len__(self) -> int:
        return len(self.vids) + len(self.new_vids) - len(self.gone)

    def add(self, vid: int, count: int) -> None:
        if vid in self.gone:  # removed and added back (a new caption): the removal applies to the old entry only
            self.settle()
        self.new_vids.append(vid)
        self.new_counts.append(count)

    def settle(self) -> tuple[np.ndarray, np.ndarray]:
        if self.new_vids:
            self.vids = np.concatenate([self.vids, np.array(self.new_vids, np.int64)])
            self.counts = np.concatenate([self.counts, np.array(self.new_counts, np.float64)])
            self.new_vids, self.new_counts = [], []
        if self.gone:
            keep = ~np.isin(self.vids, np.fromiter(self.gone, np.int64, len(self.gone)))
            self.vids, self.counts = self.vids[keep], self.counts[keep]
            self.gone = set()
        return self.vids, self.counts


class KeywordIndex:
    """Word -> postings, and each document's length, for BM25 top-k over the collection's texts."""

    def __init__(self, text_fields: Sequence[str] = ()):
        self.text_fields = tuple(sorted(text_fields))
        self._postings: dict[str, _Postings] = {}
        self._lengths = np.zeros(1024, np.float64)  # by vid: words in its document (0: not a document)
        self._ids: dict[int, str] = {}  # vid -> item id, of documents: ties rank by id (collection.rank_key)
        self._documents = 0
        self._words = 0
        self._lock = threading.Lock()

    def document(self, caption: Optional[str], metadata: Mapping[str, str]) -> list[str]:
        """The words of an item's document: its caption, then its text fields' values."""
        parts = [caption or "", *(metadata.get(name, "") for name in self.text_fields)]
        return words(" ".join(parts))

    # ------------------------------------------------------------ writes (the writer thread)
    def load(self, rows: Iterable[tuple[int, str, Optional[str], Mapping[str, str]]]) -> None:
        """Every item's (vid, id, caption, metadata), replacing what the index held: tokenized here, postings
        built with numpy (one (word, vid) pair per word seen)."""
        vocabulary: dict[str, int] = {}
        word_ids: list[int] = []
        vids: list[int] = []
        lengths: dict[int, int] = {}
        ids: dict[int, str] = {}
        for vid, item_id, caption, metadata in rows:
            document = self.document(caption, metadata)
            if document:
                word_ids.extend([vocabulary.setdefault(w, len(vocabulary)) for w in document])
                vids.extend([vid] * len(document))
                lengths[vid] = len(document)
                ids[vid] = item_id
        top = max(lengths, default=0) + 1
        pairs, counts = np.unique(np.array(word_ids, np.int64) * top + np.array(vids, np.int64), return_counts=True)
        starts = np.searchsorted(pairs // top, np.arange(len(vocabulary) + 1))
        postings = {word: _Postings(pairs[starts[i]:starts[i + 1]] % top, counts[starts[i]:starts[i + 1]].astype(np.float64))
                    for word, i in vocabulary.items()}
        with self._lock:
            self._postings, self._documents, self._words = postings, len(lengths), sum(lengths.values())
            self._ids = ids
            self._lengths = np.zeros(max(1024, 2 * top), np.float64)
            self._lengths[list(lengths)] = list(lengths.values())

    def add(self, vid: int, item_id: str, caption: Optional[str], metadata: Mapping[str, str]) -> None:
        with self._lock:
            self._add(vid, item_id, self.document(caption, metadata))

    def remove(self, vid: int, caption: Optional[str], metadata: Mapping[str, str]) -> None:
        """Forget the document an item had (its caption and metadata as they were indexed)."""
        with self._lock:
            self._remove(vid, self.document(caption, metadata))

    def recaption(self, vid: int, item_id: str, old: Optional[str], new: Optional[str],
                  metadata: Mapping[str, str]) -> None:
        with self._lock:
            self._remove(vid, self.document(old, metadata))
            self._add(vid, item_id, self.document(new, metadata))

    def _add(self, vid: int, item_id: str, document: list[str]) -> None:
        if not document:
            return
        self._ids[vid] = item_id
        if vid >= len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros(max(vid + 1, 2 * len(self._lengths)), np.float64)])
        for word, count in Counter(document).items():
            self._postings.setdefault(word, _Postings()).add(vid, count)
        self._lengths[vid] = len(document)
        self._documents += 1
        self._words += len(document)

    def _remove(self, vid: int, document: list[str]) -> None:
        if not document:
            return
        for word in set(document):
            self._postings[word].gone.add(vid)
        self._ids.pop(vid, None)
        self._lengths[vid] = 0
        self._documents -= 1
        self._words -= len(document)

    # ------------------------------------------------------------ reads (any thread)
    def search(self, text: str, limit: int, allowed: Optional[np.ndarray] = None) -> list[tuple[int, float]]:
        """(vid, BM25) of the first `limit` documents holding any word of `text` (among `allowed` vids when
        given) in ranking order: score descending, ties by item id (`collection.rank_key`), cut there; [] when
        `text` has no word. Equal documents score equal (CoCa repeats captions), so a tie group can hold most
        of a collection: it is cut here by id, never read whole."""
        with self._lock:
            vids, scores = self._scored(query_terms(text))
            if allowed is not None and len(vids):
                keep = np.isin(vids, allowed)
                vids, scores = vids[keep], scores[keep]
            if len(vids) > limit:  # the best `limit`: sorting all matches costs more
                vids, scores = self._first(vids, scores, limit)
            ids = [self._ids[vid] for vid in vids.tolist()]
        order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
        return [(int(vids[i]), float(scores[i])) for i in order]

    def _first(self, vids: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The `limit` documents first in ranking order: those scoring above the limit-th best score, and of
        those tied with it the ones with the least ids."""
        if limit <= 0:
            return vids[:0], scores[:0]
        cut = np.partition(scores, len(scores) - limit)[len(scores) - limit]
        above, tied = np.flatnonzero(scores > cut), np.flatnonzero(scores == cut)
        room = limit - len(above)
        if len(tied) > room:
            tied_vids = vids[tied].tolist()
            least = heapq.nsmallest(room, range(len(tied_vids)), key=lambda j: self._ids[tied_vids[j]])
            tied = tied[np.array(least, np.int64)]
        keep = np.concatenate([above, tied])
        return vids[keep], scores[keep]

    def _scored(self, terms: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every document holding a term, with its BM25 summed over the terms."""
        if not self._documents:
            return np.zeros(0, np.int64), np.zeros(0)
        average = self._words / self._documents
        found, parts = [], []
        for term in terms:
            postings = self._postings.get(term)
            if postings is None or not len(postings):
                continue
            vids, counts = postings.settle()
            idf = max(math.log((self._documents - len(vids) + 0.5) / (len(vids) + 0.5)), IDF_FLOOR)
            norm = K1 * (1 - B + B * self._lengths[vids] / average)
            found.append(vids)
            parts.append(idf * counts * (K1 + 1) / (counts + norm))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0)
        if len(found) == 1:
            return found[0], parts[0]
        dense = np.bincount(np.concatenate(found), weights=np.concatenate(parts), minlength=len(self._lengths))
        vids = np.flatnonzero(dense)  # every term's share is > 0 (idf >= IDF_FLOOR)
        return vids, dense[vids]
