"""The seam between the servicer and where items live: one small interface, two implementations.

* `search_service.engine.Engine`: the embedded default — SQLite (truth) + blob files + an
  in-process FAISS index, one process owning one data directory.
* `search_service.milvus.MilvusCollection`: items in a Milvus collection, bytes in a blob
  directory (local or a shared mount); the service holds no state of its own, so any number of
  replicas can serve and write the same collection.

The servicer only ever talks to a `Collection`; it never knows which one it has. Methods block;
asyncio callers use asyncio.to_thread. Identity of items: an id (default: derived from the
content's sha256, so the same bytes get the same id everywhere) and the content sha256.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np

from .caption_retry import MemoryRetryBook, RetryBook
from .query import Filter, Order
from .store import AddOutcome, ConflictError, Item, NewItem, NewScene, NewVideo, Video, VideoOutcome

T = TypeVar("T")


@dataclass
class Hit:
    item: Item
    score: float  # the exact inner product of the query with the item's stored embedding
    position: Optional[list] = None  # in a search ordered by a field: where the hit sits (a page resumes after it)
    vector_rank: int = 0  # KEYWORD/HYBRID modes: where the lists placed it (1 = first; 0 = not in that list)
    keyword_rank: int = 0
    keyword_score: float = 0.0  # the keyword relevance (BM25, higher is better)


def rank_key(hit: Hit) -> tuple[float, str]:
    """The one order of every ranking, in every store and mode: score descending, then item id ascending."""
    return -hit.score, hit.item.id


MAX_SEARCH_DEPTH = 10_000  # the default of how deep search pages reach (ServiceConfig.max_search_depth)


def whole_ties(search: Callable[[int], Sequence[T]], n: int, score: Callable[[T], float],
               most: int = MAX_SEARCH_DEPTH) -> list[T]:
    """The best `n` results and every result tied with the n-th, from `search(m)` (the best m results, highest
    score first, ties in whatever order the index keeps them; or more: whole tie groups): searched one deeper,
    and deeper again while the last result found still ties with the n-th, but never past `most` results (or
    n + 1): a tie group deeper than that is cut where the index cuts it. An index cuts a tie group where it
    likes (by internal id, by heap order), so a cut inside one would make answers at different depths disagree;
    indexes that can break ties by item id themselves (keywords.py) need none of this."""
    most = max(most, n + 1)
    want = n + 1
    while True:
        found = list(search(want))
        if len(found) <= n:
            return found
        cut = score(found[n - 1])
        if len(found) != want or score(found[-1]) < cut or want >= most:  # fewer: all; more: whole groups
            return [r for r in found if score(r) >= cut]
        want = min(2 * want, most)


def first_hits(search: Callable[[int], Sequence[Hit]], k: int, most: int = MAX_SEARCH_DEPTH) -> list[Hit]:
    """The first `k` hits in ranking order (`rank_key`), from `search(m)`: the best m by score (ties widened
    up to `most` hits deep: `whole_ties`)."""
    return sorted(whole_ties(search, k, lambda h: h.score, most), key=rank_key)[:k]


@dataclass
class Page:
    items: list[Item]
    total: int  # items passing the filter, on all pages
    next_after: Optional[list]  # the position the next page resumes after; None: this was the last page


class Unsupported(Exception):
    """This store cannot do what was asked; the message names the store and the feature."""


class QueryError(ValueError):
    """A query vector the index cannot take (wrong dimension, NaN or infinite values)."""


class StoreUnavailable(Exception):
    """The store behind a collection cannot be reached (a remote engine is down); retry later."""


def check_query(query: np.ndarray, dim: Optional[int]) -> np.ndarray:
    """A flat float32 query of the collection's dimension with finite values, or QueryError."""
    query = np.asarray(query, np.float32).reshape(-1)
    if dim is None:
        raise QueryError("the collection is not open yet")
    if query.shape[0] != dim:
        raise QueryError(f"query vector has {query.shape[0]} dimensions, the index {dim}")
    if not np.isfinite(query).all():
        raise QueryError("query vector holds NaN or infinite values")
    return query


class Collection(abc.ABC):
    """Items with embeddings, metadata, captions and image bytes; searched by inner product."""

    # ------------------------------------------------------------ life cycle
    @property
    @abc.abstractmethod
    def dim(self) -> Optional[int]:
        """The embedding dimension of a collection that already exists (None: nothing bound yet)."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """Searchable: `open_index` has run."""

    @abc.abstractmethod
    def bind_model(self, model: str, pretrained: str, dim: int) -> None:
        """Record the model whose embeddings the collection holds; ModelMismatchError for another one."""

    @abc.abstractmethod
    def open_index(self, dim: int, progress: bool = False) -> str:
        """Make the collection searchable; returns a line saying how (loaded, rebuilt, connected)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush what needs flushing and release resources."""

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached now (health checks); local stores can."""

    # ------------------------------------------------------------ writes
    @abc.abstractmethod
    def add(self, items: list[NewItem]) -> list[AddOutcome | ConflictError]:
        """Store new items durably; content already present is a duplicate (its id), not an error."""

    @abc.abstractmethod
    def delete(self, item_id: str) -> Optional[Item]:
        """Remove an item and its bytes; returns what was removed, None if unknown."""

    @abc.abstractmethod
    def set_captions(self, captions: dict[str, str]) -> None:
        """Keep captions by item id (ids deleted meanwhile are skipped)."""

    # ------------------------------------------------------------ videos (search_service/video.py)
    keeps_videos = False  # add_video and the rest work (the embedded store)
    VIDEOS_MISSING = ("videos: this store keeps no video rows and no scene table (a video's scenes must be added and "
                      "deleted with it in one commit); index videos into the embedded store (--vector-store faiss)")

    def add_video(self, video: NewVideo, scenes: list[NewScene]) -> VideoOutcome | ConflictError:
        """Store a video (its bytes, once) and its scenes (items) in one commit: all or nothing; the same content
        again adds nothing (its outcome says so, with the scenes stored)."""
        raise Unsupported(self.VIDEOS_MISSING)

    def get_video(self, video_id: str) -> Optional[Video]:
        """A video and its scenes (None if unknown)."""
        return None

    def find_video_sha(self, sha256: str) -> Optional[Video]:
        return None

    def delete_video(self, video_id: str) -> Optional[Video]:
        """Remove a video and all its scenes in one commit; returns what was removed, None if unknown."""
        return None

    def read_video(self, video: Video) -> bytes:
        raise Unsupported(self.VIDEOS_MISSING)

    def video_file(self, video: Video) -> Path:
        """The file holding the video's bytes (its blob, or the server-side file it was indexed from)."""
        raise Unsupported(self.VIDEOS_MISSING)

    # ------------------------------------------------------------ reads
    @abc.abstractmethod
    def get(self, item_id: str, with_embedding: bool = False) -> Optional[Item]: ...

    @abc.abstractmethod
    def find_sha(self, sha256: str) -> Optional[Item]: ...

    @abc.abstractmethod
    def read_image(self, item: Item) -> bytes:
        """The item's bytes (checked against its sha256); BlobError when they cannot be read."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Searchable items, as last known; never blocks (callers on an event loop use it)."""

    @abc.abstractmethod
    def search(self, query: np.ndarray, k: int, filters: Filter | dict[str, str] | None = None,
               min_score: Optional[float] = None, consistency: Optional[str] = None,
               order: Optional[Order] = None, after: Optional[list] = None) -> list[Hit]:
        """Best `k` live items for a unit query vector passing `filters`, in ranking order (`rank_key`: score
        descending, ties by id; a tie group at the cut is followed up to the search depth: `whole_ties`), each
        with its exact score. With `order`: the first `k` passing items (scoring at least min_score) in that
        field's order, after the position `after` (a previous hit's `position`).

        `consistency` (Strong, Session, Bounded, Eventually) matters to shared remote stores only."""

    def ranking(self, query: np.ndarray, n: int, filters: Filter | dict[str, str] | None = None,
                min_score: Optional[float] = None, consistency: Optional[str] = None) -> list[Hit]:
        """`search`'s first `n` hits by score, whose items may hold only their id and sha256 (a store that reads
        rows apart from its ranking: a page fills only the hits it shows, with `filled`)."""
        return self.search(query, n, filters, min_score, consistency)

    def filled(self, hits: list[Hit], consistency: Optional[str] = None) -> list[Hit]:
        """Hits of `ranking` with their whole items (read at `consistency`, as the ranking was), in the same
        order; hits deleted meanwhile are left out."""
        return hits

    @functools.cached_property
    def retry_book(self) -> RetryBook:
        """Where ingest captions that failed wait for the retry job; this default keeps them in memory
        (a restart forgets them). A store that can keep them durably returns its own."""
        return MemoryRetryBook()

    def captioned(self) -> Optional[int]:
        """Items with a stored caption (metrics); None where the store cannot count them cheaply."""
        return None

    def keyword_search(self, text: str, k: int, filters: Filter | dict[str, str] | None = None) -> list[Hit]:
        """The `k` live items passing `filters` whose caption or text fields (the schema's `text` metadata) best
        match the words of `text` (BM25), in ranking order (`rank_key`); `Hit.score` is the keyword relevance. Unsupported where the store has no full-text index."""
        raise Unsupported(f"keyword search over captions: {type(self).__name__} has no full-text index")

    @abc.abstractmethod
    def list_items(self, filters: Filter | dict[str, str] | None, order: Optional[Order], after: Optional[list],
                   limit: int, with_embeddings: bool = False, consistency: Optional[str] = None) -> Page:
        """Up to `limit` items passing `filters`, in `order` (None: the store's own stable order), after
        the position `after` (the previous page's `next_after`)."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """count, indexed, index_type, index_active, model, pretrained, embedding_dim, sequence numbers."""
