"""The FAISS index: derived from the store, snapshotted atomically, caught up at start-up.

Vectors are unit-norm float32 and the metric is inner product, so scores are
cosine similarities. FAISS ids are the store's `vid`s (never reused, and
increasing in commit order).

Ids: the IVF family keeps the ids it is given and removes by them
(`add_with_ids` / `remove_ids` on the IVF itself, also under a pre-transform).
Every other index is wrapped in `IndexIDMap`. An `IndexIDMap` may only forward
removals to an index that compacts its codes in order (`IndexFlatCodes`: Flat,
PQ, SQ, LSH); anything else (HNSW, NSG, refine wrappers) keeps deleted ids as
tombstones that searches exclude through an IDSelector, and is rebuilt from
the store when tombstones pass a quarter of the vectors. (IndexIDMap over IVF
went wrong twice: FAISS aborted the process in `remove_ids` on an assertion,
or answered other items' ids after a removal.)

An index that needs training (IVF, PQ) is served by an exact Flat index until
the store holds enough vectors to train it (`train_per_centroid` per IVF list
or PQ centroid, 39 as FAISS recommends); then it is trained once on the
store's vectors and swapped in.

Filtered searches (`allowed`: the vids a metadata filter matches) are exact
when the selection is small (a brute-force scan of the selected vectors, inside
FAISS when the index keeps them uncompressed), and otherwise searched in the
ANN index with a selector and a search budget (HNSW efSearch, IVF nprobe)
widened by the inverse of the selectivity, so selective filters do not lose
results (bench: `coca bench search --filter-selectivity ...`).

Snapshot file, written to a temp file, fsynced and renamed:
    b"COCAIDX2" | u32 header length | header JSON | tombstones (int64) | faiss.write_index bytes
The header records the store's uuid, the factory, the dimension and `seq`, the
last store change the snapshot includes. Nothing is unpickled: the header is
JSON, the rest is FAISS's own format. (COCAIDX1 snapshots wrapped IVF in
IndexIDMap2, which is wrong after deletes: they are refused and rebuilt.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
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

MAGIC = b"COCAIDX2"
FALLBACK = "Flat"
TOMBSTONE_REBUILD_FRACTION = 0.25
BITMAP_SELECTOR_MIN = 1024  # selections at least this large use a bitmap selector, smaller ones a hash set


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
    train_per_centroid: int = 39  # training vectors wanted per IVF list / PQ centroid (FAISS's advice)
    rerank: int = 4  # lossy codes (PQ, SQ, ...): candidates re-scored exactly per result wanted
    exact_fraction: float = 0.02  # filters selecting at most this share of the items are searched exactly ...
    exact_min: int = 4096  # ... and so are selections of at most this many items, whatever their share
    max_ef_search: int = 4096  # the widest HNSW search a selective filter may ask for


def validate_factory(factory: str, dim: int) -> None:
    """Raise ValueError early for a factory string FAISS would reject."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS index factory {factory!r} for dimension {dim}: {exc}") from None
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        raise ValueError(f"FAISS index factory {factory!r}: drop the refinement stage (RFlat/Refine): "
                         "candidates of lossy indexes are already re-scored exactly from the stored vectors")


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index under IndexIDMap / IndexPreTransform wrappers, downcast."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def keeps_ids(index: faiss.Index) -> bool:
    """IVF indexes store the ids given to add_with_ids and remove by them: no IndexIDMap needed."""
    return isinstance(_unwrap(index), faiss.IndexIVF)


def min_training_vectors(index: faiss.Index, per_centroid: int = 39) -> int:
    """How many vectors FAISS wants to train `index` well (0 when it needs no training)."""
    if index.is_trained:
        return 0
    need = 1
    with contextlib.suppress(RuntimeError):
        need = max(need, per_centroid * faiss.extract_index_ivf(index).nlist)
    pq = getattr(_unwrap(index), "pq", None)
    if pq is not None:
        need = max(need, per_centroid * (1 << pq.nbits))
    return need


def _flat_storage(index: faiss.Index) -> Optional[faiss.IndexFlat]:
    """The uncompressed vectors of an IndexIDMap over Flat or HNSW-Flat (positions = id_map order)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexIDMap):
        return None
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return inner if isinstance(inner, faiss.IndexFlat) else None


def is_lossless(index: faiss.Index) -> bool:
    """Scores from this index are the exact inner products (no compression, no transform)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _selector(vids: np.ndarray, keep_alive: list) -> faiss.IDSelector:
    """A FAISS selector of exactly `vids` (sorted, unique); the arrays it reads go into keep_alive."""
    if len(vids) < BITMAP_SELECTOR_MIN:
        return faiss.IDSelectorBatch(vids)
    size = int(vids[-1]) + 1
    mask = np.zeros(size, np.uint8)
    mask[vids] = 1
    bits = np.packbits(mask, bitorder="little")
    keep_alive.append(bits)
    # FAISS takes the bitmap's length in BYTES (id selected iff id // 8 < n and its bit is set): given
    # the bit count it read past the mask and admitted items after the selection's last one.
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))


class VectorIndex:
    """A FAISS index over the store's vectors, safe to use from several threads."""

    def __init__(self, dim: int, settings: IndexSettings):
        self.dim = dim
        self.settings = settings
        validate_factory(settings.factory, dim)
        self.lock = ReadWriteLock()
        self.seq = 0  # last store change applied
        self.tombstones: set[int] = set()
        self.index, self.active = self._empty(settings.factory)
        self._id_map: Optional[np.ndarray] = None  # cached id_map of a flat-storage IndexIDMap

    # ------------------------------------------------------------ construction
    def _new(self, factory: str) -> faiss.Index:
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        # faiss trains IVF-PQ codes for polysemous filtering by default: simulated annealing the engine never
        # uses (no polysemous_ht search), 281 of 358 s training IVF64,PQ64x8 on 20k x 512 vectors, 1.2 s of
        # 1.2 s for 36 vectors (the store model's IVF2,PQ4x4)
        if getattr(inner, "do_polysemous_training", False):
            inner.do_polysemous_training = False
        return inner if keeps_ids(inner) else faiss.IndexIDMap(inner)

    def _empty(self, factory: str) -> tuple[faiss.Index, str]:
        index = self._new(factory)
        if index.is_trained:
            return index, factory
        return self._new(FALLBACK), FALLBACK

    def training_needed(self) -> int:
        probe = faiss.index_factory(self.dim, self.settings.factory, faiss.METRIC_INNER_PRODUCT)
        return min_training_vectors(probe, self.settings.train_per_centroid)

    @property
    def waiting_for_training(self) -> bool:
        return self.active != self.settings.factory

    @property
    def lossy(self) -> bool:
        """Scores are approximate (compressed codes): callers re-score candidates exactly."""
        return not is_lossless(self.index)

    @property
    def removes_in_place(self) -> bool:
        if keeps_ids(self.index):
            return True
        return isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlatCodes)

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
            self._id_map = None
        log.info("built %s index over %d vectors in %.1f s", active, count, time.perf_counter() - started)

    def _trained(self, store: Store, count: int) -> tuple[faiss.Index, str]:
        factory = self.settings.factory
        index = self._new(factory)
        sample = _sample(store, count, self.settings.max_train)
        log.info("training %s on %d vectors", factory, len(sample))
        index.train(sample)
        return index, factory

    # ------------------------------------------------------------ changes
    def add(self, vids: np.ndarray, vectors: np.ndarray, seq: int) -> None:
        with self.lock.write():
            if len(vids):
                self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(vids, np.int64))
                self._id_map = None
            self.seq = max(self.seq, seq)

    def remove(self, vids: list[int], seq: int) -> None:
        with self.lock.write():
            if vids:
                if self.removes_in_place:
                    self.index.remove_ids(np.asarray(vids, np.int64))
                    self._id_map = None
                else:  # HNSW and the like cannot remove: excluded at search time, rebuilt later
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

    # ------------------------------------------------------------ reads
    @property
    def size(self) -> int:
        """Live vectors. Lock-free (two int reads), so callers on an event loop never wait for a writer."""
        return self.index.ntotal - len(self.tombstones)

    def ids(self) -> np.ndarray:
        """Every live vid in the index, sorted (for checks and tests)."""
        with self.lock.read():
            if keeps_ids(self.index):
                ivf = faiss.extract_index_ivf(self.index)
                invlists = ivf.invlists
                parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                         for i in range(ivf.nlist) if invlists.list_size(i)]
                ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            else:
                ids = faiss.vector_to_array(self.index.id_map)
            if self.tombstones:
                ids = ids[~np.isin(ids, np.fromiter(self.tombstones, np.int64))]
        return np.sort(ids)

    def search(self, query: np.ndarray, k: int, allowed: Optional[np.ndarray] = None) -> list[tuple[int, float]]:
        """Best `k` (vid, score), highest score first, among `allowed` vids (sorted, unique) when given.

        Scores are exact for lossless indexes; for lossy ones they are the codes' estimates.
        """
        query = np.ascontiguousarray(query, np.float32).reshape(1, self.dim)
        # One query needs no OpenMP team: on a busy 2-core machine its barriers cost ~35 ms a
        # search (measured: flat 20k x 64 took 35 ms with 2 threads, 0.5 ms with 1). The
        # setting is per calling thread; concurrent requests run on threads of their own.
        faiss.omp_set_num_threads(1)
        with self.lock.read():
            live = self.index.ntotal - len(self.tombstones)
            if live <= 0 or (allowed is not None and not len(allowed)) or k <= 0:
                return []
            keep_alive: list = []
            if allowed is not None and self.tombstones:
                allowed = allowed[~np.isin(allowed, np.fromiter(self.tombstones, np.int64))]
            if allowed is not None and self.exact_for(len(allowed), live):
                found = self._exact_in_storage(query, k, allowed, keep_alive)
                if found is not None:
                    return found
            params = self._params(k, allowed, live, keep_alive)
            scores, ids = self.index.search(query, min(k, self.index.ntotal), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def exact_for(self, selected: int, live: int) -> bool:
        """Whether a filter selecting `selected` of `live` items is searched exactly."""
        return selected <= max(self.settings.exact_min, self.settings.exact_fraction * live)

    @property
    def keeps_vectors(self) -> bool:
        """Exact filtered searches can run inside FAISS (no need to read the store's vectors)."""
        return _flat_storage(self.index) is not None or isinstance(_unwrap(self.index), faiss.IndexIVFFlat)

    def _exact_in_storage(self, query, k, allowed, keep_alive) -> Optional[list[tuple[int, float]]]:
        """Brute force over the allowed vectors inside FAISS; None when the index keeps no exact vectors."""
        storage = _flat_storage(self.index)
        if storage is not None:
            id_map = self._positions_map()
            positions = np.searchsorted(id_map, allowed)
            inside = positions < len(id_map)
            positions = positions[inside][id_map[positions[inside]] == allowed[inside]]
            if not len(positions):
                return []
            selector = _selector(positions, keep_alive)
            scores, pos = storage.search(query, min(k, len(positions)), params=faiss.SearchParameters(sel=selector))
            return [(int(id_map[p]), float(s)) for p, s in zip(pos[0], scores[0]) if p >= 0]
        ivf = _unwrap(self.index)
        if isinstance(ivf, faiss.IndexIVFFlat):  # every list, only the allowed ids: exact
            params = faiss.SearchParametersIVF(nprobe=ivf.nlist, sel=_selector(allowed, keep_alive))
            scores, ids = self.index.search(query, min(k, len(allowed)), params=params)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        return None

    def vectors_of(self, vids: np.ndarray) -> Optional[np.ndarray]:
        """The stored vectors of `vids`, in that order (NaN rows for vids the index does not hold), when
        the index keeps them uncompressed in flat storage (Flat, HNSW-Flat); None otherwise."""
        with self.lock.read():
            storage = _flat_storage(self.index)
            if storage is None:
                return None
            id_map = self._positions_map()
            out = np.full((len(vids), self.dim), np.nan, np.float32)
            if not len(id_map) or not len(vids):
                return out
            positions = np.minimum(np.searchsorted(id_map, vids), len(id_map) - 1)
            found = id_map[positions] == vids
            xb = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * self.dim).reshape(storage.ntotal, self.dim)
            out[found] = xb[positions[found]]  # a copy: valid after the lock
        return out

    def _positions_map(self) -> np.ndarray:
        """id_map as an array (sorted: vids are added in increasing order and removals keep the order)."""
        id_map = self._id_map
        if id_map is None or len(id_map) != self.index.ntotal:
            id_map = faiss.vector_to_array(self.index.id_map)
            if len(id_map) > 1 and not np.all(id_map[1:] > id_map[:-1]):
                raise RuntimeError("index id map out of order")  # cannot happen: vids only grow
            self._id_map = id_map
        return id_map

    def _params(self, k: int, allowed: Optional[np.ndarray], live: int, keep_alive: list):
        selector = None
        if allowed is not None:
            selector = _selector(allowed, keep_alive)
        elif self.tombstones:
            dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
            selector = faiss.IDSelectorNot(dead)
            keep_alive.append(dead)
        keep_alive.append(selector)
        # A filter passing a share s of the items leaves ~s of what the search visits: widen it by 1/s.
        widen = 1.0 if allowed is None else live / max(len(allowed), 1)
        inner = _unwrap(self.index)
        if isinstance(inner, faiss.IndexHNSW):
            ef = max(self.settings.ef_search, k)
            if widen > 1:
                ef = max(ef, min(self.settings.max_ef_search, math.ceil(ef * widen)))
            return faiss.SearchParametersHNSW(efSearch=int(ef), sel=selector)
        if isinstance(inner, faiss.IndexIVF):
            nprobe = min(inner.nlist, math.ceil(self.settings.nprobe * widen))
            return faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    # ------------------------------------------------------------ snapshot
    def save(self, path: Path, store_uuid: str) -> int:
        """Write the snapshot atomically; returns the seq it covers. On failure nothing is left behind."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with self.lock.read():  # searches may go on; changes wait
                header = json.dumps({
                    "store_uuid": store_uuid, "factory": self.settings.factory, "active": self.active,
                    "dim": self.dim, "seq": self.seq, "tombstones": len(self.tombstones),
                    "ntotal": self.index.ntotal,
                }).encode()
                with open(tmp, "wb") as out:
                    out.write(MAGIC + struct.pack("<I", len(header)) + header)
                    out.write(np.fromiter(sorted(self.tombstones), np.int64, len(self.tombstones)).tobytes())
                    faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write))
                    out.flush()
                    os.fsync(out.fileno())
                seq = self.seq
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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
        # read_index gives an owning, already-typed object: keep it (a downcast copy would not own it)
        wrapped_right = keeps_ids(index) != isinstance(faiss.downcast_index(index), faiss.IndexIDMap)
        if not wrapped_right or index.ntotal != header["ntotal"] or index.d != dim:
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
        raise ValueError("not a coca-search index snapshot of this version")
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
    """Up to `limit` of the store's vectors, evenly spread over vid order (copies: chunks are freed)."""
    step = max(1, math.ceil(count / limit))
    parts = [vectors[::step].copy() for _, vectors in store.embeddings()]
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
