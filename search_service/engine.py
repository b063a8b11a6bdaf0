"""Store + index, kept in step: the part of the service that knows no gRPC and no Triton.

Every write (add, delete, caption) runs on one writer thread, which commits to
SQLite and then applies the change to FAISS before returning: the index never
runs ahead of the store, changes reach FAISS in commit order, and a snapshot
taken on that thread covers exactly the changes up to its recorded seq.
Reads (search, get) run on any thread. The methods block; asyncio callers use
asyncio.to_thread.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from .index import EXACT_FILTER_LIMIT, IndexSettings, SnapshotError, VectorIndex, factory_label
from .store import AddOutcome, ConflictError, Item, NewItem, Store

log = logging.getLogger("search_service.engine")
T = TypeVar("T")


def snapshot_file(factory: str) -> str:
    """One snapshot per index type, so switching --index back and forth reuses each."""
    return f"index-{factory_label(factory)}.faiss"


@dataclass
class Hit:
    item: Item
    score: float


class Engine:
    """The durable collection: open it, add and delete items, search it, close it."""

    def __init__(self, data_dir: str | Path, settings: IndexSettings, snapshot_every: int = 10_000):
        self.store = Store(data_dir)
        self.settings = settings
        self.snapshot_every = snapshot_every
        self.snapshot_path = Path(data_dir) / snapshot_file(settings.factory)
        self.index: Optional[VectorIndex] = None
        self.snapshot_seq = 0
        self.exact_filter_limit = EXACT_FILTER_LIMIT
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")

    # ------------------------------------------------------------ life cycle
    @property
    def dim(self) -> Optional[int]:
        value = self.store.info().get("embedding_dim")
        return int(value) if value else None

    def bind_model(self, model: str, pretrained: str, dim: int) -> None:
        self.store.bind_model(model, pretrained, dim)

    def open_index(self, dim: int, progress: bool = False) -> str:
        """Load the snapshot and replay newer changes, or rebuild from the store; says which."""
        self.index, how = self._load_or_rebuild(dim, progress)
        self.snapshot_seq = self.index.seq if how.startswith("snapshot") else 0
        replayed = self.index.catch_up(self.store)
        if replayed or how.startswith("rebuilt"):
            self._snapshot()
        return f"{how}; replayed {replayed} changes; {self.index.size} vectors ({self.index.active})"

    def _load_or_rebuild(self, dim: int, progress: bool) -> tuple[VectorIndex, str]:
        try:
            index = VectorIndex.load(self.snapshot_path, self.settings, self.store.store_uuid(), dim)
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
    def add(self, items: list[NewItem]) -> list[AddOutcome | ConflictError]:
        return self._write(lambda: self._add(items))

    def delete(self, item_id: str) -> Optional[Item]:
        return self._write(lambda: self._delete(item_id))

    def set_captions(self, captions: dict[int, str]) -> None:
        if captions:
            self._write(lambda: self.store.set_captions(captions))

    def _write(self, fn: Callable[[], T]) -> T:
        return self._writer.submit(fn).result()

    def _add(self, items: list[NewItem]) -> list[AddOutcome | ConflictError]:
        outcomes = self.store.add(items)
        new = [(o.vid, item.embedding) for o, item in zip(outcomes, items) if isinstance(o, AddOutcome) and o.added]
        vids = np.array([v for v, _ in new], np.int64)
        vectors = np.stack([e for _, e in new]) if new else np.zeros((0, self.index.dim), np.float32)
        self.index.add(vids, vectors, self.store.last_seq())
        self._after_write()
        return outcomes

    def _delete(self, item_id: str) -> Optional[Item]:
        item = self.store.delete(item_id)
        if item is not None:
            self.index.remove([item.vid], self.store.last_seq())
            self._after_write()
        return item

    def _after_write(self) -> None:
        if self.index.needs_rebuild():
            self.index.rebuild(self.store)
            self._snapshot()
        elif self.index.seq - self.snapshot_seq >= self.snapshot_every:
            self._snapshot()

    def _snapshot(self) -> None:
        started = time.perf_counter()
        seq = self.index.save(self.snapshot_path, self.store.store_uuid())
        self.store.prune_changes(seq)
        self.snapshot_seq = seq
        log.info("index snapshot at seq %d (%.2f s)", seq, time.perf_counter() - started)

    def _snapshot_if_changed(self) -> None:
        if self.index.seq != self.snapshot_seq or not self.snapshot_path.exists():
            self._snapshot()

    # ------------------------------------------------------------ reads
    def search(self, query: np.ndarray, k: int, filters: Optional[dict[str, str]] = None,
               min_score: Optional[float] = None) -> list[Hit]:
        """Best `k` items for a unit query vector, highest score first."""
        allowed = self.store.matching(filters) if filters else None
        if allowed is not None and len(allowed) <= self.exact_filter_limit:
            ranked = self._exact(query, k, allowed)
        else:
            ranked = self.index.search(query, k, allowed)
        if min_score is not None:
            ranked = [(vid, score) for vid, score in ranked if score >= min_score]
        items = self.store.get_many([vid for vid, _ in ranked])
        return [Hit(items[vid], score) for vid, score in ranked if vid in items]  # skips items deleted meanwhile

    def _exact(self, query: np.ndarray, k: int, vids: set[int]) -> list[tuple[int, float]]:
        """Exact scores over a few items (a selective filter), from the store's vectors."""
        scored: list[tuple[int, float]] = []
        for ids, vectors in self.store.embeddings(sorted(vids)):
            scored.extend(zip(ids.tolist(), (vectors @ query.astype(np.float32)).tolist()))
        scored.sort(key=lambda pair: -pair[1])
        return scored[:k]

    def stats(self) -> dict:
        info = self.store.info()
        return {
            "count": self.store.count(),
            "indexed": self.index.size if self.index else 0,
            "index_type": self.settings.factory,
            "index_active": self.index.active if self.index else "",
            "model": info.get("model", ""),
            "pretrained": info.get("pretrained", ""),
            "embedding_dim": int(info.get("embedding_dim", 0)),
            "last_sequence": self.store.last_seq(),
            "snapshot_sequence": self.snapshot_seq,
        }
