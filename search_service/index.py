"""The FAISS index: derived from the store, snapshotted atomically, caught up at start-up.

Vectors are unit-norm float32 and the metric is inner product, so scores are
cosine similarities. FAISS ids are the store's `vid`s (never reused).

The index is built from a factory string wrapped in IndexIDMap2 (`Flat`,
`HNSW32`, `IVF1024,Flat`, `IVF1024,PQ32`, ...). An index that needs training
(IVF, PQ) is served by an exact Flat index until the store holds enough
vectors to train it (39 per IVF list, 39 * 256 for PQ codebooks, as FAISS
recommends); then it is trained once on the store's vectors and swapped in.

Indexes that cannot remove vectors (HNSW) keep deleted ids as tombstones that
searches exclude through an IDSelector, and are rebuilt from the store when
tombstones pass a quarter of the vectors.

Snapshot file (index.faiss), written to a temp file, fsynced and renamed:
    b"COCAIDX1" | u32 header length | header JSON | tombstones (int64) | faiss.write_index bytes
The header records the store's uuid, the factory, the dimension and `seq`, the
last store change the snapshot includes. Nothing is unpickled: the header is
JSON, the rest is FAISS's own format.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import faiss
import numpy as np

from .store import Store, fsync_dir

log = logging.getLogger("search_service.index")

MAGIC = b"COCAIDX1"
FALLBACK = "Flat"
EXACT_FILTER_LIMIT = 4096  # filters matching at most this many items are scored exactly
TOMBSTONE_REBUILD_FRACTION = 0.25


class ReadWriteLock:
    """Many readers at once, or one writer; a waiting writer holds off new readers.

    FAISS searches are safe to run concurrently (they release the GIL, so two
    queries use two cores); adds and removes are not safe next to anything.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class SnapshotError(Exception):
    """A snapshot that cannot be used (absent, corrupt, of another store or another factory)."""


@dataclass
class IndexSettings:
    factory: str = "Flat"
    ef_search: int = 128  # HNSW: candidates kept while searching
    nprobe: int = 32  # IVF: lists visited per query
    max_train: int = 200_000  # vectors used to train IVF/PQ


def validate_factory(factory: str, dim: int) -> None:
    """Raise ValueError early for a factory string FAISS would reject."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS index factory {factory!r} for dimension {dim}: {exc}") from None


def min_training_vectors(index: faiss.Index) -> int:
    """How many vectors FAISS wants to train `index` well (0 when it needs no training)."""
    if index.is_trained:
        return 0
    need = 1
    with contextlib.suppress(RuntimeError):
        ivf = faiss.extract_index_ivf(index)
        need = max(need, 39 * ivf.nlist)
    inner = faiss.downcast_index(index)
    pq = getattr(inner, "pq", None)
    if pq is not None:
        need = max(need, 39 * (1 << pq.nbits))
    return need


class VectorIndex:
    """An id-mapped FAISS index over the store's vectors, safe to use from several threads."""

    def __init__(self, dim: int, settings: IndexSettings):
        self.dim = dim
        self.settings = settings
        validate_factory(settings.factory, dim)
        self.lock = ReadWriteLock()
        self.seq = 0  # last store change applied
        self.tombstones: set[int] = set()
        self.index, self.active = self._empty(settings.factory)

    # ------------------------------------------------------------ construction
    def _empty(self, factory: str) -> tuple[faiss.IndexIDMap2, str]:
        index = faiss.IndexIDMap2(faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT))
        if index.is_trained:
            return index, factory
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim)), FALLBACK

    def training_needed(self) -> int:
        probe = faiss.index_factory(self.dim, self.settings.factory, faiss.METRIC_INNER_PRODUCT)
        return min_training_vectors(probe)

    @property
    def waiting_for_training(self) -> bool:
        return self.active != self.settings.factory

    def rebuild(self, store: Store, progress: bool = False) -> None:
        """Build from every item in the store (trains the target index when there are enough vectors)."""
        started = time.perf_counter()
        with store.snapshot_view():  # vectors and seq from one consistent state
            seq = store.last_seq()
            count = store.count()
            need = self.training_needed()
            if need and count >= need:
                index, active = self._trained(store, count)
            else:
                index, active = self._empty(self.settings.factory)
            _add_all(index, store, count, progress, active)
        with self.lock.write():
            self.index, self.active, self.seq, self.tombstones = index, active, seq, set()
        log.info("built %s index over %d vectors in %.1f s", active, count, time.perf_counter() - started)

    def _trained(self, store: Store, count: int) -> tuple[faiss.IndexIDMap2, str]:
        factory = self.settings.factory
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        sample = _sample(store, count, self.settings.max_train)
        log.info("training %s on %d vectors", factory, len(sample))
        inner.train(sample)
        return faiss.IndexIDMap2(inner), factory

    # ------------------------------------------------------------ changes
    def add(self, vids: np.ndarray, vectors: np.ndarray, seq: int) -> None:
        with self.lock.write():
            if len(vids):
                self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(vids, np.int64))
            self.seq = max(self.seq, seq)

    def remove(self, vids: list[int], seq: int) -> None:
        with self.lock.write():
            if vids:
                try:
                    self.index.remove_ids(np.asarray(vids, np.int64))
                except RuntimeError:  # HNSW cannot remove: exclude at search time instead
                    self.tombstones.update(vids)
            self.seq = max(self.seq, seq)

    def needs_rebuild(self) -> bool:
        """Training data has arrived, or tombstones have piled up."""
        with self.lock.read():
            live = self.index.ntotal - len(self.tombstones)
            if self.waiting_for_training:
                need = self.training_needed()
                return bool(need) and live >= need
            return len(self.tombstones) > TOMBSTONE_REBUILD_FRACTION * max(self.index.ntotal, 1)

    def catch_up(self, store: Store) -> int:
        """Apply the store changes after `self.seq`; returns how many were applied."""
        changes = store.changes_after(self.seq)
        if not changes:
            return 0
        added = {c.vid for c in changes if c.op == "add"}
        deleted = {c.vid for c in changes if c.op == "delete"}
        to_add = sorted(added - deleted)  # added then deleted within the window: never indexed
        to_remove = sorted(deleted - added)  # added before the snapshot
        last = changes[-1].seq
        for vids, vectors in store.embeddings(to_add):
            self.add(vids, vectors, 0)
        self.remove(to_remove, last)
        self.add(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), last)
        return len(changes)

    # ------------------------------------------------------------ search
    @property
    def size(self) -> int:
        with self.lock.read():
            return self.index.ntotal - len(self.tombstones)

    def search(self, query: np.ndarray, k: int, allowed: Optional[set[int]] = None) -> list[tuple[int, float]]:
        """Best `k` (vid, score), highest score first, among `allowed` vids when given."""
        query = np.ascontiguousarray(query, np.float32).reshape(1, self.dim)
        # One query needs no OpenMP team: on a busy 2-core machine its barriers cost ~35 ms a
        # search (measured: flat 20k x 64 took 35 ms with 2 threads, 0.5 ms with 1). The
        # setting is per calling thread; concurrent requests run on threads of their own.
        faiss.omp_set_num_threads(1)
        with self.lock.read():
            if self.index.ntotal == 0 or (allowed is not None and not allowed):
                return []
            keep_alive = []  # selectors referenced by params must outlive the search
            params = self._params(k, allowed, keep_alive)
            scores, ids = self.index.search(query, min(k, self.index.ntotal), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _params(self, k: int, allowed: Optional[set[int]], keep_alive: list):
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.fromiter(allowed, np.int64, len(allowed)))
        elif self.tombstones:
            dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
            selector = faiss.IDSelectorNot(dead)
            keep_alive.append(dead)
        keep_alive.append(selector)
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=max(self.settings.ef_search, k), sel=selector)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(nprobe=self.settings.nprobe, sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    # ------------------------------------------------------------ snapshot
    def save(self, path: Path, store_uuid: str) -> int:
        """Write the snapshot atomically; returns the seq it covers."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with self.lock.read():  # searches may go on; changes wait
            header = json.dumps({
                "store_uuid": store_uuid, "factory": self.settings.factory, "active": self.active,
                "dim": self.dim, "seq": self.seq, "tombstones": len(self.tombstones), "ntotal": self.index.ntotal,
            }).encode()
            with open(tmp, "wb") as out:
                out.write(MAGIC + struct.pack("<I", len(header)) + header)
                out.write(np.fromiter(sorted(self.tombstones), np.int64, len(self.tombstones)).tobytes())
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write))
                out.flush()
                os.fsync(out.fileno())
            seq = self.seq
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return seq

    @classmethod
    def load(cls, path: Path, settings: IndexSettings, store_uuid: str, dim: int) -> "VectorIndex":
        """Read a snapshot written by `save`; SnapshotError if it is unusable for this store and settings."""
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                _check_header(header, settings, store_uuid, dim)
                tombstones = np.frombuffer(_read_exactly(f, 8 * header["tombstones"]), np.int64)
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot at {path}") from None
        except (OSError, RuntimeError, ValueError, KeyError, struct.error) as exc:
            raise SnapshotError(f"{path}: unreadable snapshot ({exc})") from None
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal != header["ntotal"] or index.d != dim:
            raise SnapshotError(f"{path}: snapshot content does not match its header")
        self = cls(dim, settings)
        self.index, self.active, self.seq = index, header["active"], header["seq"]
        self.tombstones = set(tombstones.tolist())
        return self


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


def _read_header(f) -> dict:
    if _read_exactly(f, len(MAGIC)) != MAGIC:
        raise ValueError("not a coca-search index snapshot")
    (length,) = struct.unpack("<I", _read_exactly(f, 4))
    return json.loads(_read_exactly(f, length))


def _check_header(header: dict, settings: IndexSettings, store_uuid: str, dim: int) -> None:
    if header["store_uuid"] != store_uuid:
        raise SnapshotError("snapshot belongs to another store")
    if header["factory"] != settings.factory:
        raise SnapshotError(f"snapshot is a {header['factory']!r} index, configured {settings.factory!r}")
    if header["dim"] != dim:
        raise SnapshotError(f"snapshot has dimension {header['dim']}, the store {dim}")


def _sample(store: Store, count: int, limit: int) -> np.ndarray:
    """Up to `limit` of the store's vectors, evenly spread over vid order."""
    step = max(1, count // limit)
    parts = [vectors[::step] for _, vectors in store.embeddings()]
    return np.ascontiguousarray(np.concatenate(parts)[:limit])


def _add_all(index: faiss.Index, store: Store, count: int, progress: bool, name: str) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, unit="vec", desc=f"building {name} index")
    for vids, vectors in store.embeddings():
        index.add_with_ids(vectors, vids)
        if bar is not None:
            bar.update(len(vids))
    if bar is not None:
        bar.close()


def factory_label(factory: str) -> str:
    """A file-name-safe form of a factory string."""
    return re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")
