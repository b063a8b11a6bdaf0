"""Store + index, kept in step: the part of the service that knows no gRPC and no Triton.

Every write (add, delete, caption, model binding) runs on one writer thread,
which commits to SQLite and then applies the change to FAISS and to the
in-memory filter and keyword indexes before returning: the index never runs ahead of the
store, changes reach FAISS in commit order, and a snapshot taken on that thread
covers exactly the changes up to its recorded seq. A write is acknowledged
once committed: snapshot or rebuild failures after it (a full disk, say) are
logged and retried later with a backoff, never turned into the write's answer.
Reads (search, get) run on any thread. The methods block; asyncio callers use
asyncio.to_thread. Nothing outside this class touches the store or the index.
"""
from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from .caption_retry import CaptionRetry, RetryBook
from .collection import MAX_SEARCH_DEPTH, Collection, Hit, Page, QueryError, check_query, first_hits, whole_ties
from . import generations
from .filters import MetadataIndex
from .index import IndexSettings, SnapshotError, VectorIndex, factory_label
from .keywords import KeywordIndex
from .query import Filter, Order, QueryInputError, Schema
from .store import AddOutcome, ConflictError, Item, NewItem, NewScene, NewVideo, Store, Video, VideoOutcome

log = logging.getLogger("search_service.engine")
T = TypeVar("T")

SNAPSHOT_RETRY_S = (1.0, 300.0)  # first and longest wait before retrying a failed snapshot/rebuild
# min_score on a lossy index: candidates widen x4 while too few pass, up to this many times the first pool
# (rerank per hit wanted); an item whose code estimate ranks below that is missed (README, Search)
MAX_RERANK_WIDENING = 16


def snapshot_file(factory: str) -> str:
    """One snapshot per index type, so switching --index back and forth reuses each."""
    return f"index-{factory_label(factory)}.faiss"


__all__ = ["Engine", "Hit", "QueryError", "snapshot_file"]


def row_scores(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each row's inner product with the query, computed row by row the same way wherever the row sits (a BLAS
    matrix-vector product rounds rows in a block's tail differently, so equal vectors could score apart by an
    ulp and a ranking's tie order would depend on which items were read together); rounded to float32 as the
    index's scores are."""
    return (vectors * query).sum(axis=1, dtype=np.float64).astype(np.float32).astype(np.float64)


class Engine(Collection):
    """The embedded collection: SQLite + blob files + FAISS in this process, one writer thread."""

    keeps_videos = True

    def __init__(self, data_dir: str | Path, settings: IndexSettings, snapshot_every: int = 10_000,
                 schema: Schema = Schema(), max_search_depth: int = MAX_SEARCH_DEPTH):
        self.store = Store(data_dir)
        self.max_search_depth = max_search_depth  # vector tie groups are followed this deep (whole_ties)
        self.settings = settings
        self.schema = schema
        self.snapshot_every = snapshot_every
        self.snapshot_path = Path(data_dir) / snapshot_file(settings.factory)
        self.index: Optional[VectorIndex] = None
        self.metadata = MetadataIndex(schema)
        self.keywords = KeywordIndex(schema.text_fields)
        self.snapshot_seq = 0
        self.snapshot_failures = 0
        self._retry_at = 0.0  # monotonic time before which a failed snapshot is not tried again
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        # the model generation searches answer from; None while a switch changes the vectors (generations.py)
        self.generation: Optional[int] = generations.active_generation(self.store)

    # ------------------------------------------------------------ life cycle
    @property
    def dim(self) -> Optional[int]:
        value = self.store.info().get("embedding_dim")
        return int(value) if value else None

    @property
    def is_open(self) -> bool:
        return self.index is not None

    def bind_model(self, model: str, pretrained: str, dim: int) -> None:
        self._write(lambda: self.store.bind_model(model, pretrained, dim))

    def open_index(self, dim: int, progress: bool = False) -> str:
        """Load the snapshot and replay newer changes, or rebuild from the store; says which."""
        return self._write(lambda: self._open_index(dim, progress))

    def _open_index(self, dim: int, progress: bool) -> str:
        swept = self.store.sweep_blobs()
        index, how = self._load_or_rebuild(dim, progress)
        self.snapshot_seq = index.seq if how.startswith("snapshot") else 0
        replayed = index.catch_up(self.store)
        self.metadata.load(self.store.item_times(), self.store.metadata_rows())
        self.keywords.load(self.store.item_texts(with_metadata=bool(self.keywords.text_fields)))
        self.index = index
        if replayed or how.startswith("rebuilt"):
            self._snapshot_or_retry_later()
        cleaned = f"; removed {swept} unreferenced blob file(s)" if swept else ""
        return f"{how}; replayed {replayed} changes; {index.size} vectors ({index.active}){cleaned}"

    def _load_or_rebuild(self, dim: int, progress: bool) -> tuple[VectorIndex, str]:
        try:
            index = VectorIndex.load(self.snapshot_path, self.settings, self.snapshot_owner(), dim)
            if not self.store.pruned_seq() <= index.seq <= self.store.last_seq():
                raise SnapshotError(f"snapshot at seq {index.seq} cannot be caught up: the store's change log "
                                    f"holds seq {self.store.pruned_seq()}..{self.store.last_seq()}")
            return index, f"snapshot at seq {index.seq}"
        except SnapshotError as exc:
            reason = str(exc)
        index = VectorIndex(dim, self.settings)
        index.rebuild(self.store, progress=progress)
        return index, f"rebuilt from the store ({reason})"

    def close(self) -> None:
        """Snapshot (when anything changed) and release the store."""
        if self.index is not None:
            self._writer.submit(self._snapshot_if_changed).result()
        self._writer.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------ writes (writer thread)
    def add(self, items: list[NewItem], generation: Optional[int] = None) -> list[AddOutcome | ConflictError]:
        """Commit new items (their kept bytes staged first, on the caller's thread); one outcome each.
        `generation`: the one whose model embedded them; GenerationChanged (nothing stored) when the store
        answers from another one by the time the writer commits them."""
        staged = []
        try:
            for item in items:
                staged.append(self.store.stage_blob(item.data) if item.data is not None else None)
        except BaseException:
            for path in staged:
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
        return self._write(lambda: self._add(items, staged, generation))

    def delete(self, item_id: str) -> Optional[Item]:
        return self._write(lambda: self._delete(item_id))

    def add_video(self, video: NewVideo, scenes: list[NewScene]) -> VideoOutcome | ConflictError:
        staged = self.store.stage_blob(video.data) if video.data is not None else None
        return self._write(lambda: self._add_video(video, scenes, staged))

    def delete_video(self, video_id: str) -> Optional[Video]:
        return self._write(lambda: self._delete_video(video_id))

    def set_captions(self, captions: dict[str, str]) -> None:
        if captions:
            self._write(lambda: self._set_captions(captions))

    @functools.cached_property
    def retry_book(self) -> RetryBook:
        return _StoreRetryBook(self.store, self._write)

    def snapshot(self) -> None:
        """Write a snapshot now (raises on failure, unlike the automatic ones)."""
        self._write(self._snapshot)

    def backup(self, out: Path, progress=None):
        """A consistent copy into `out` while writes go on (search_service/backup.py); blocks."""
        from .backup import backup_store

        release = lambda: self._write(self.store.release_blob_deletes)  # noqa: E731 (placing blobs runs there)
        return backup_store(self.store, Path(out), [self.snapshot_path], progress, release=release)

    # ------------------------------------------------------------ model generations (generations.py)
    def snapshot_owner(self) -> str:
        """Whose vectors an index snapshot holds: this store's, of its active generation."""
        gen = generations.active_generation(self.store)
        return self.store.store_uuid() + (f"/generation-{gen}" if gen else "")

    def generation_records(self) -> dict[str, generations.Generation]:
        return generations.generations(self.store)

    def begin_generation(self, active: generations.Generation, target: generations.Generation
                         ) -> generations.Generation:
        return self._write(lambda: generations.begin(self.store, active, target))

    def generation_lacking(self, gen: int, after_vid: Optional[int], limit: int) -> tuple[list[Item], Optional[int]]:
        """Up to `limit` live items after `after_vid` lacking their generation-`gen` vector, and the vid to go on
        after (reindex.fill)."""
        items = generations.lacking(self.store, gen, after_vid or 0, limit)
        return items, items[-1].vid if items else after_vid

    def generation_embedded(self, gen: int) -> int:
        return generations.embedded(self.store, gen)

    def put_generation(self, gen: int, items: list[Item], vectors: np.ndarray) -> None:
        self._write(lambda: generations.put(self.store, gen, [i.vid for i in items], vectors))

    def switch_generation(self, gen: int, dim: int) -> Optional[generations.Generation]:
        """Answer from generation `gen` from now on (its FAISS index built here, off the writer); None while a
        live item lacks its vector (embed those, then ask again)."""
        view = generations.GenerationView(self.store, gen)
        index = VectorIndex(dim, self.settings)
        index.rebuild(view)
        return self._write(lambda: self._switch(gen, index, view.missing))

    def _switch(self, gen: int, index: VectorIndex, missing: list[int]) -> Optional[generations.Generation]:
        if generations.lacking(self.store, gen, 0, 1):
            return None
        answering, self.generation = self.generation, None  # searches meanwhile wait (or retry)
        try:
            switched = generations.switch(self.store, gen)
        except BaseException:
            self.generation = answering
            raise
        if switched is None:
            self.generation = answering
            return None
        if self.store.pruned_seq() > index.seq:  # snapshots pruned the log the view's index needs: build anew
            index.rebuild(self.store)
        else:
            index.catch_up(self.store)
            for vids, vectors in self.store.embeddings(missing):  # lacking when the view was read; deleted: skipped
                index.add(vids, vectors, 0)
        self.index, self.generation = index, gen
        self._snapshot_or_retry_later()
        return switched

    def drop_old_generation(self) -> Optional[int]:
        return self._write(lambda: generations.drop_old(self.store))

    def captions_by_old_models(self) -> int:
        return generations.captions_by_old_models(self.store)

    def _write(self, fn: Callable[[], T]) -> T:
        return self._writer.submit(fn).result()

    def _add(self, items: list[NewItem], staged: list, generation: Optional[int] = None
             ) -> list[AddOutcome | ConflictError]:
        if generation is not None and generation != self.generation:
            for path in staged:
                if path is not None:
                    path.unlink(missing_ok=True)
            raise generations.GenerationChanged(f"embedded by generation {generation}, the store answers from "
                                                f"generation {self.generation} now")
        outcomes = self.store.add(items, staged)
        new = [(o, item) for o, item in zip(outcomes, items) if isinstance(o, AddOutcome) and o.added]
        vids = np.array([o.vid for o, _ in new], np.int64)
        vectors = np.stack([item.embedding for _, item in new]) if new else np.zeros((0, self.index.dim), np.float32)
        self.index.add(vids, vectors, self.store.last_seq())
        for outcome, item in new:
            self.metadata.add(outcome.vid, item.metadata, outcome.created_at)
            self.keywords.add(outcome.vid, outcome.id, None, item.metadata)
        self._after_write()
        return outcomes

    def _add_video(self, video: NewVideo, scenes: list[NewScene], staged) -> VideoOutcome | ConflictError:
        outcome = self.store.add_video(video, scenes, staged)
        if isinstance(outcome, VideoOutcome) and outcome.added and scenes:
            vids = np.array([row.vid for row in outcome.scenes], np.int64)
            self.index.add(vids, np.stack([scene.item.embedding for scene in scenes]), self.store.last_seq())
            for row, scene in zip(outcome.scenes, scenes):
                self.metadata.add(row.vid, scene.item.metadata, row.created_at)
                self.keywords.add(row.vid, row.id, scene.caption, scene.item.metadata)
            self._after_write()
        return outcome

    def _delete_video(self, video_id: str) -> Optional[Video]:
        removed = self.store.delete_video(video_id)
        if removed is None:
            return None
        video, items = removed
        if items:
            self.index.remove([item.vid for item in items], self.store.last_seq())
            for item in items:
                self.metadata.remove(item.vid, item.metadata)
                self.keywords.remove(item.vid, item.caption, item.metadata)
            self._after_write()
        return video

    def _set_captions(self, captions: dict[str, str]) -> None:
        before = [item for item in map(self.store.get, captions) if item is not None]  # deleted meanwhile: skipped
        self.store.set_captions(captions)
        for item in before:
            self.keywords.recaption(item.vid, item.id, item.caption, captions[item.id], item.metadata)

    def _delete(self, item_id: str) -> Optional[Item]:
        item = self.store.delete(item_id)
        if item is not None:
            self.index.remove([item.vid], self.store.last_seq())
            self.metadata.remove(item.vid, item.metadata)
            self.keywords.remove(item.vid, item.caption, item.metadata)
            self._after_write()
        return item

    def _after_write(self) -> None:
        """Rebuild (training arrived, tombstones piled up) or snapshot when due; never fails the write."""
        if time.monotonic() < self._retry_at:
            return
        try:
            if self.index.needs_rebuild():
                self.index.rebuild(self.store)
                self._snapshot()
            elif self.index.seq - self.snapshot_seq >= self.snapshot_every:
                self._snapshot()
        except Exception as exc:  # the write itself is committed: it stands
            self._failed_snapshot(exc)

    def _snapshot_or_retry_later(self) -> None:
        try:
            self._snapshot()
        except Exception as exc:
            self._failed_snapshot(exc)

    def _failed_snapshot(self, exc: Exception) -> None:
        self.snapshot_failures += 1
        first, longest = SNAPSHOT_RETRY_S
        wait = min(longest, first * 2 ** min(self.snapshot_failures - 1, 16))
        self._retry_at = time.monotonic() + wait
        log.error("index snapshot/rebuild failed (%s: %s); committed writes stand, retrying in %.0f s",
                  type(exc).__name__, exc, wait)

    def _snapshot(self) -> None:
        started = time.perf_counter()
        seq = self.index.save(self.snapshot_path, self.snapshot_owner())
        self.store.prune_changes(seq)
        self.snapshot_seq = seq
        self.snapshot_failures, self._retry_at = 0, 0.0
        log.info("index snapshot at seq %d (%.2f s)", seq, time.perf_counter() - started)

    def _snapshot_if_changed(self) -> None:
        if self.index.seq != self.snapshot_seq or not self.snapshot_path.exists():
            self._snapshot_or_retry_later()

    # ------------------------------------------------------------ reads
    def get(self, item_id: str, with_embedding: bool = False) -> Optional[Item]:
        return self.store.get(item_id, with_embedding)

    def find_sha(self, sha256: str) -> Optional[Item]:
        return self.store.find_sha(sha256)

    def read_image(self, item: Item) -> bytes:
        return self.store.read_image(item)

    def get_video(self, video_id: str) -> Optional[Video]:
        return self.store.get_video(video_id)

    def find_video_sha(self, sha256: str) -> Optional[Video]:
        return self.store.find_video_sha(sha256)

    def read_video(self, video: Video) -> bytes:
        return self.store.read_video(video)

    def video_file(self, video: Video) -> Path:
        return self.store.video_file(video)

    @property
    def size(self) -> int:
        """Searchable vectors (0 before the index is open); never waits for a writer."""
        return self.index.size if self.index is not None else 0

    def search(self, query: np.ndarray, k: int, filters: Filter | dict[str, str] | None = None,
               min_score: Optional[float] = None, consistency: Optional[str] = None,
               order: Optional[Order] = None, after: Optional[list] = None) -> list[Hit]:
        """Best `k` items for a unit query vector, highest score first, each with its exact score; or with
        `order`, the first `k` passing items (above min_score) in that order, after position `after`.
        (Always from everything committed: `consistency` has no weaker choice here.)"""
        query = check_query(query, self.index.dim if self.index is not None else None)
        flt = Filter.of(filters)
        allowed = self.metadata.matching(flt) if flt else None
        if order is not None:
            return self._ordered_search(query, k, allowed, min_score, order, after)
        return first_hits(lambda n: self._best(query, n, allowed, min_score), k, self.max_search_depth)

    def _best(self, query: np.ndarray, n: int, allowed: Optional[np.ndarray], min_score: Optional[float]) -> list[Hit]:
        """The best `n` items by score (ties in the index's order), scoring at least min_score."""
        index = self.index
        if allowed is not None and not index.keeps_vectors and index.exact_for(len(allowed), index.size):
            ranked = self._exact(query, n, allowed.tolist())
        elif index.lossy:
            ranked = self._reranked(query, n, allowed, min_score)
        else:
            ranked = index.search(query, n, allowed)
        if min_score is not None:
            ranked = [(vid, score) for vid, score in ranked if score >= min_score]
        items = self.store.get_many([vid for vid, _ in ranked])
        return [Hit(items[vid], score) for vid, score in ranked if vid in items]  # skips items deleted meanwhile

    def _reranked(self, query: np.ndarray, n: int, allowed: Optional[np.ndarray],
                  min_score: Optional[float]) -> list[tuple[int, float]]:
        """Approximate codes: `rerank` candidates per hit wanted by the codes' estimates (a tie of estimates
        followed up to max_search_depth), re-scored exactly. With min_score, more candidates (x4) while fewer than
        `n` pass it, the index has more, and the pool is within MAX_RERANK_WIDENING times the first: an estimate
        can fall far below an item's true score (a short answer ends a query's pages), but a min_score few items
        reach must not re-score the whole collection."""
        first = n * self.settings.rerank
        everything = self.index.size if allowed is None else len(allowed)
        pool, most = first, min(everything, first * MAX_RERANK_WIDENING)
        while True:
            candidates = whole_ties(lambda m: self.index.search(query, m, allowed), pool, lambda pair: pair[1],
                                    max(self.max_search_depth, pool + 1))
            ranked = self._exact(query, n, [vid for vid, _ in candidates])
            short = min_score is not None and sum(score >= min_score for _, score in ranked) < n
            if not short or pool >= most:  # enough pass, or the widening is spent
                return ranked
            pool = min(4 * pool, most)

    def keyword_search(self, text: str, k: int, filters: Filter | dict[str, str] | None = None) -> list[Hit]:
        flt = Filter.of(filters)
        allowed = self.metadata.matching(flt) if flt else None

        matches = self.keywords.search(text, k, allowed)  # cut in ranking order (ties by id): no widening
        items = self.store.get_many([vid for vid, _ in matches])
        return [Hit(items[vid], score) for vid, score in matches if vid in items]

    def _ordered_search(self, query: np.ndarray, k: int, allowed: Optional[np.ndarray], min_score: Optional[float],
                        order: Order, after: Optional[list]) -> list[Hit]:
        """Walk the passing items in `order`, scoring them exactly a chunk at a time, until `k` pass min_score."""
        vids = self.metadata.ordered(self.metadata.live() if allowed is None else allowed, order,
                                     self._check_position(after, order))
        found: list[tuple[int, float]] = []
        chunk = max(256, 4 * k)
        for start in range(0, len(vids), chunk):
            part = vids[start:start + chunk]
            scores = self._scores(query, part)
            keep = ~np.isnan(scores) if min_score is None else scores >= min_score  # NaN: deleted meanwhile
            found.extend(zip(part[keep].tolist(), scores[keep].tolist()))
            if len(found) >= k:
                break
        found = found[:k]
        items = self.store.get_many([vid for vid, _ in found])
        positions = self.metadata.positions(np.array([vid for vid, _ in found], np.int64), order)
        return [Hit(items[vid], score, position) for (vid, score), position in zip(found, positions) if vid in items]

    def list_items(self, filters: Filter | dict[str, str] | None, order: Optional[Order], after: Optional[list],
                   limit: int, with_embeddings: bool = False, consistency: Optional[str] = None) -> Page:
        flt = Filter.of(filters)
        vids = self.metadata.matching(flt) if flt else self.metadata.live()
        ordered = self.metadata.ordered(vids, order, self._check_position(after, order))
        page = ordered[:limit]
        items = self.store.get_many(page.tolist(), with_embeddings)
        more = len(ordered) > limit and len(page)
        next_after = self.metadata.positions(page[-1:], order)[0] if more else None
        return Page([items[vid] for vid in page.tolist() if vid in items], len(vids), next_after)

    @staticmethod
    def _check_position(after: Optional[list], order: Optional[Order]) -> Optional[list]:
        """A resume position from a page token: [vid], or [value or None, vid] in a field order."""
        if after is None:
            return None
        shape = ((float, int, type(None)), int) if order is not None else (int,)
        if (not isinstance(after, list) or len(after) != len(shape)
                or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(after, shape))):
            raise QueryInputError("page_token does not fit this listing's order")
        return after

    def _scores(self, query: np.ndarray, vids: np.ndarray) -> np.ndarray:
        """Exact scores of `vids` in their order (NaN for vids no longer stored): from the index's own
        uncompressed vectors when it keeps them, else from the store."""
        vectors = self.index.vectors_of(vids)
        if vectors is not None:
            return row_scores(vectors, query)
        scores = dict(self._exact(query, len(vids), vids.tolist()))
        return np.array([scores.get(vid, np.nan) for vid in vids.tolist()], np.float64)

    def _exact(self, query: np.ndarray, k: int, vids: list[int]) -> list[tuple[int, float]]:
        """Exact scores of a few items, from the store's float32 vectors; the best k, highest first."""
        vids_list, scores = [], []
        for ids, vectors in self.store.embeddings(vids):
            vids_list.append(ids)
            scores.append(row_scores(vectors, query))
        if not vids_list:
            return []
        ids, values = np.concatenate(vids_list), np.concatenate(scores)
        order = np.lexsort((ids, -values))[:k]  # ties: lower vid first, as a stable answer
        return [(int(ids[i]), float(values[i])) for i in order]

    def captioned(self) -> int:
        return self.store.captioned()

    def stats(self) -> dict:
        info = self.store.info()
        return {
            "count": self.store.count(),
            "indexed": self.size,
            "index_type": self.settings.factory,
            "index_active": self.index.active if self.index else "",
            "model": info.get("model", ""),
            "pretrained": info.get("pretrained", ""),
            "embedding_dim": int(info.get("embedding_dim", 0)),
            "last_sequence": self.store.last_seq(),
            "snapshot_sequence": self.snapshot_seq,
        }


class _StoreRetryBook(RetryBook):
    """The caption retry book in the store's SQLite (table caption_retry): survives restarts. Writes go
    through the engine's writer thread like every other write."""

    durable = True

    def __init__(self, store: Store, write: Callable):
        self.store, self._write = store, write

    def add(self, failures: dict[str, str], next_at: float) -> None:
        self._write(lambda: self.store.add_caption_retries(failures, next_at))

    def due(self, now: float, limit: int) -> list[CaptionRetry]:
        return [CaptionRetry(*row) for row in self.store.captions_due(now, limit)]

    def failed(self, item_id: str, retries: int, error: str, next_at: Optional[float]) -> None:
        self._write(lambda: self.store.caption_retry_failed(item_id, retries, error, next_at))

    def done(self, item_id: str) -> None:
        self._write(lambda: self.store.caption_retry_done(item_id))

    def counts(self) -> tuple[int, int]:
        return self.store.caption_retry_counts()
