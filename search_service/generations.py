"""Model generations of the embedded store: the embeddings of one model, the tables a reindex fills, the switch.

The store answers from one generation at a time: `items.embedding` always holds the active generation's
vectors, so every reader (FAISS rebuilds, exact scores, Get, backups) is unchanged. A reindex builds
another generation beside it::

    generations              gen, model, pretrained, embedding_dim, weights (export hash), triton (its endpoints),
                             state: 'active' | 'building' | 'old'
    generation_embeddings    (gen, vid) -> embedding: the one being built, and the old one kept for rollback
    caption_models           (vid, gen, updated_at): a caption made by an earlier generation's decoder

Progress is the rows themselves: a live item lacks its row in the generation being built until it is embedded
(committed in batches), so a reindex killed at any point resumes with exactly the items still missing, and an
item added meanwhile (a new vid) is simply missing too. A deleted item's row is never read (rows are joined
with `items`) and goes at the switch. No change log is needed.

The switch is one SQLite transaction on the writer thread, refused while any live item lacks its row: the
active vectors move into the old generation's rows, the new ones into `items.embedding`, and the store info
names the new model and generation. The FAISS index over the new vectors is built before it, off the writer
(GenerationView), caught up after it, and swapped in before the writer takes the next write. The index
snapshot is owned by (store, generation) (Engine.snapshot_owner): one of another generation is never loaded.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .store import Item, Store, _item, _stack

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    gen           INTEGER PRIMARY KEY,
    model         TEXT NOT NULL,
    pretrained    TEXT NOT NULL,
    embedding_dim INTEGER NOT NULL,
    weights       TEXT NOT NULL,      -- the export's repository id (a hash of all its weights)
    triton        TEXT NOT NULL,      -- HOST:PORT[,HOST:PORT...] that served it when recorded
    state         TEXT NOT NULL CHECK (state IN ('active', 'building', 'old')),
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS generation_embeddings (
    gen       INTEGER NOT NULL,
    vid       INTEGER NOT NULL,
    embedding BLOB NOT NULL,          -- float32, unit norm
    PRIMARY KEY (gen, vid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS caption_models (
    vid        INTEGER PRIMARY KEY,   -- items.vid
    gen        INTEGER NOT NULL,      -- the generation whose decoder made its caption
    updated_at REAL NOT NULL          -- items.updated_at then: a caption set later is the newer model's
);
"""
_LACKING = "NOT EXISTS (SELECT 1 FROM generation_embeddings g WHERE g.gen = ? AND g.vid = i.vid)"


class GenerationError(Exception):
    """A generation operation that cannot go on as asked (no generation to resume or roll back to, ...)."""


class GenerationChanged(Exception):
    """Vectors of one generation offered to a store that answers from another now: embed them again.

    `committed`: outcomes of a write that landed in the generation it was embedded for while another replica
    switched the store away from it (Milvus): it is made again in the new one, and the client is told what this
    one did. `results`: those as the service's add results (set by the service)."""

    def __init__(self, message: str, committed: Optional[list] = None):
        super().__init__(message)
        self.committed = committed or []
        self.results: list = []


@dataclass
class Generation:
    gen: int
    model: str
    pretrained: str
    embedding_dim: int
    weights: str
    triton: str
    state: str

    def __str__(self) -> str:
        return (f"generation {self.gen}: {self.model} ({self.pretrained}, dim {self.embedding_dim}, "
                f"weights {self.weights[:12]})")


def ensure_tables(store: Store) -> None:
    """Create the tables (writer thread; a store that never reindexed gains them at its first reindex)."""
    store._writer.executescript(SCHEMA)


def active_generation(store: Store) -> int:
    return int(store.info().get("generation", 0))


def generations(store: Store) -> dict[str, Generation]:
    """The recorded generations by state ({} before the first reindex)."""
    db = store._reader()
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'generations'").fetchone():
        return {}
    rows = db.execute("SELECT gen, model, pretrained, embedding_dim, weights, triton, state FROM generations")
    return {row[6]: Generation(*row) for row in rows}


def begin(store: Store, active: Generation, target: Generation) -> Generation:
    """Record `active` (when not yet) and start building `target` (numbered next) or go on with the generation
    being built when it is the same export. Another one being built is dropped. Writer thread."""
    ensure_tables(store)
    with store._transaction() as db:
        db.execute("INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?, 'active', ?)",
                   (active.gen, active.model, active.pretrained, active.embedding_dim, active.weights,
                    active.triton, time.time()))
        row = db.execute("SELECT gen, weights FROM generations WHERE state = 'building'").fetchone()
        if row is not None and row[1] == target.weights:
            db.execute("UPDATE generations SET triton = ? WHERE gen = ?", (target.triton, row[0]))
            target.gen = row[0]
            return target
        if row is not None:
            _forget(db, row[0])
        target.gen = db.execute("SELECT max(gen) + 1 FROM generations").fetchone()[0]
        db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, 'building', ?)",
                   (target.gen, target.model, target.pretrained, target.embedding_dim, target.weights,
                    target.triton, time.time()))
    return target


def _forget(db, gen: int) -> None:
    db.execute("DELETE FROM generation_embeddings WHERE gen = ?", (gen,))
    db.execute("DELETE FROM generations WHERE gen = ?", (gen,))


def lacking(store: Store, gen: int, after_vid: int, limit: int) -> list[Item]:
    """Live items after `after_vid` (in vid order) that have no embedding of generation `gen` yet."""
    rows = store._reader().execute(
        f"SELECT {Store._COLUMNS} FROM items i WHERE i.vid > ? AND {_LACKING} ORDER BY i.vid LIMIT ?",
        (after_vid, gen, limit))
    return [_item(row) for row in rows]


def embedded(store: Store, gen: int) -> int:
    """Live items that have their generation-`gen` embedding."""
    return store._reader().execute("SELECT count(*) FROM generation_embeddings g JOIN items i ON i.vid = g.vid "
                                   "WHERE g.gen = ?", (gen,)).fetchone()[0]


def put(store: Store, gen: int, vids: list[int], vectors: np.ndarray) -> None:
    """Record generation-`gen` embeddings (one transaction; writer thread)."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    with store._transaction() as db:
        db.executemany("INSERT OR REPLACE INTO generation_embeddings VALUES (?, ?, ?)",
                       [(gen, vid, vector.tobytes()) for vid, vector in zip(vids, vectors)])


def switch(store: Store, to: int) -> Optional[Generation]:
    """Make generation `to` the active one in one transaction, the active one kept as 'old' (an older 'old' one
    is forgotten); None (nothing changed) while a live item lacks its `to` embedding. Writer thread."""
    with store._transaction() as db:
        if db.execute(f"SELECT 1 FROM items i WHERE {_LACKING} LIMIT 1", (to,)).fetchone():
            return None
        row = db.execute("SELECT gen, model, pretrained, embedding_dim, weights, triton, state FROM generations "
                         "WHERE gen = ?", (to,)).fetchone()
        if row is None or row[6] == "active":
            raise GenerationError(f"no generation {to} to switch to")
        target = Generation(*row)
        source = int(dict(db.execute("SELECT key, value FROM info")).get("generation", 0))
        for (older,) in db.execute("SELECT gen FROM generations WHERE state = 'old' AND gen != ?", (to,)).fetchall():
            _forget(db, older)
        db.execute("DELETE FROM generation_embeddings WHERE gen = ?", (source,))
        db.execute("INSERT INTO generation_embeddings SELECT ?, vid, embedding FROM items", (source,))
        db.execute("UPDATE items SET embedding = (SELECT g.embedding FROM generation_embeddings g "
                   "WHERE g.gen = ? AND g.vid = items.vid)", (to,))
        db.execute("DELETE FROM generation_embeddings WHERE gen = ?", (to,))
        # captions made until now by `source`'s decoder (unless marked as an older one's already) keep that mark
        db.execute("INSERT OR REPLACE INTO caption_models (vid, gen, updated_at) "
                   "SELECT i.vid, ?, i.updated_at FROM items i LEFT JOIN caption_models c ON c.vid = i.vid "
                   "WHERE i.caption IS NOT NULL AND (c.vid IS NULL OR c.updated_at != i.updated_at)", (source,))
        db.execute("UPDATE generations SET state = 'old' WHERE gen = ?", (source,))
        db.execute("UPDATE generations SET state = 'active' WHERE gen = ?", (to,))
        db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", {
            "model": target.model, "pretrained": target.pretrained, "embedding_dim": str(target.embedding_dim),
            "generation": str(to)}.items())
    target.state = "active"
    return target


def drop_old(store: Store) -> Optional[int]:
    """Forget the generation kept for rollback; which one (None when none was kept). Writer thread."""
    old = generations(store).get("old")
    if old is None:
        return None
    with store._transaction() as db:
        _forget(db, old.gen)
    return old.gen


def captions_by_old_models(store: Store) -> int:
    """Captions still as an earlier generation's decoder made them (not remade since)."""
    db = store._reader()
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'caption_models'").fetchone():
        return 0
    return db.execute("SELECT count(*) FROM caption_models c JOIN items i ON i.vid = c.vid WHERE i.caption IS NOT "
                      "NULL AND i.updated_at = c.updated_at AND c.gen != ?", (active_generation(store),)).fetchone()[0]


class GenerationView:
    """Generation `gen`'s vectors shaped as the store VectorIndex.rebuild reads (snapshot_view, last_seq, count,
    embeddings): an index over them is built off the writer thread. `missing` holds the live items that had no
    row yet when the view's snapshot was read: the switch adds them (their add precedes `last_seq`, so no
    catch-up would)."""

    def __init__(self, store: Store, gen: int):
        self.store, self.gen = store, gen
        self.missing: list[int] = []

    @contextlib.contextmanager
    def snapshot_view(self):
        with self.store.snapshot_view() as db:
            self.missing = [r[0] for r in db.execute(f"SELECT vid FROM items i WHERE {_LACKING}", (self.gen,))]
            yield db

    def last_seq(self) -> int:
        return self.store.last_seq()

    def count(self) -> int:
        return embedded(self.store, self.gen)

    def embeddings(self, vids=None, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = self.store._reader().execute("SELECT g.vid, g.embedding FROM generation_embeddings g JOIN items i "
                                              "ON i.vid = g.vid WHERE g.gen = ? ORDER BY g.vid", (self.gen,))
        while rows := cursor.fetchmany(batch):
            yield _stack(rows)
