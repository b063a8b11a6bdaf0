"""The durable store: SQLite (WAL) is the truth; image bytes live content-addressed beside it.

Layout of a data directory::

    store.sqlite3 (+ -wal, -shm)   items, metadata index, change log, store info, captions to retry (caption_retry)
    blobs/ab/abcdef...             image bytes received over the wire, named by sha256
    index.faiss                    the derived FAISS snapshot (search_service/index.py)

Durability: the database runs with journal_mode=WAL and synchronous=FULL, so a
commit returns only after the WAL is fsynced. A kill -9 cannot lose a commit
even with synchronous=NORMAL (the WAL write has reached the OS before commit
returns); FULL also survives a power cut or kernel crash, and costs one fsync
per commit, which group commit (one transaction per batch of images) makes
cheap. Blob bytes are staged (temp file under blobs/.staging, fsynced) by the
caller's thread; the writer then decides, inside the transaction that inserts
the row, whether the item is new: only then is the staged file renamed into
place (and its directory fsynced) before the commit, otherwise it is removed.
Deletes unlink a blob on the same writer after their commit. So blob presence
is decided under the writer's serialisation, never by a racy exists-check: a
committed row never points at a missing or partial file, and an add that is
refused (duplicate content, id conflict) leaves no file behind. A crash between
rename and commit (or between a delete's commit and its unlink) leaves an
unreferenced blob; `sweep_blobs` removes those and staging leftovers at start.

Every add and delete appends to `changes` in the same transaction; its
AUTOINCREMENT `seq` is the clock the FAISS snapshot records, so start-up
replays exactly the changes the snapshot has not seen. Items are keyed for
FAISS by `vid` (AUTOINCREMENT: never reused, even after deletes).

One connection writes (the service funnels writes through one thread); reads
open their own connection per thread (WAL: readers never block the writer).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .blobs import BlobDirectory, discard, fsync_dir, fsync_dirs, sha256_hex

__all__ = ["AddOutcome", "Change", "ConflictError", "Item", "ItemRejected", "ModelMismatchError", "NewItem", "NewScene",
           "NewVideo", "SceneRow", "Store", "StoreError", "StoreSetupError", "Video", "VideoOutcome", "default_id",
           "fsync_dir", "sha256_hex"]

# 2: caption_text, an FTS5 index over captions. 3: none (KEYWORD search's index lives in memory, built from the
# items: search_service/keywords.py); a version-2 store's caption_text is dropped when opened.
SCHEMA_VERSION = "3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    vid        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    sha256     TEXT NOT NULL UNIQUE,
    uri        TEXT NOT NULL,
    blob       TEXT,                 -- path under blobs/ of bytes we keep, NULL for server-side paths
    metadata   TEXT NOT NULL DEFAULT '{}',
    embedding  BLOB NOT NULL,        -- float32, unit norm
    caption    TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS item_meta (
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    vid   INTEGER NOT NULL,
    PRIMARY KEY (key, value, vid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_meta_vid ON item_meta (vid);
-- captioned items counted without reading rows (the metrics' captioned_items; built once on an older store)
CREATE INDEX IF NOT EXISTS items_captioned ON items (vid) WHERE caption IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vid INTEGER NOT NULL,
    op  TEXT NOT NULL CHECK (op IN ('add', 'delete'))
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA += """
-- AddOptions.caption captions that failed, for the service's retry job (search_service/caption_retry.py);
-- a row goes when its item gets a caption or is deleted. (A table of its own: older stores gain it on open.)
CREATE TABLE IF NOT EXISTS caption_retry (
    vid      INTEGER PRIMARY KEY,      -- items.vid
    retries  INTEGER NOT NULL DEFAULT 0,
    next_at  REAL NOT NULL,            -- wall-clock time of the next try
    error    TEXT NOT NULL,
    given_up INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS caption_retry_due ON caption_retry (given_up, next_at);
"""
SCHEMA += """
-- Videos (search_service/video.py): a video is a row here, its scenes are items (searched like images) with a
-- row in `scenes` each; both go in one transaction and are deleted in one. (Tables of their own: older stores
-- gain them on open, empty, with no version change.)
CREATE TABLE IF NOT EXISTS videos (
    id         TEXT PRIMARY KEY,
    sha256     TEXT NOT NULL UNIQUE,
    uri        TEXT NOT NULL,
    blob       TEXT,                 -- path under blobs/ of the video bytes we keep, NULL for server-side paths
    metadata   TEXT NOT NULL DEFAULT '{}',
    duration_s REAL NOT NULL,
    sampled    INTEGER NOT NULL,     -- frames sampled and embedded
    created_at REAL NOT NULL,
    every_s    REAL                  -- the sampling interval it was cut with (NULL: a row older than the column)
);
CREATE TABLE IF NOT EXISTS scenes (
    vid       INTEGER PRIMARY KEY,   -- items.vid of the scene
    video_id  TEXT NOT NULL,         -- videos.id
    idx       INTEGER NOT NULL,      -- its place in the video, from 0
    start_s   REAL NOT NULL,
    end_s     REAL NOT NULL,
    thumbnail BLOB NOT NULL          -- the keyframe, JPEG
);
CREATE INDEX IF NOT EXISTS scenes_video ON scenes (video_id, idx);
"""
# what schema version 2 had, dropped when such a store is opened (one statement each: executescript would
# commit the migration's transaction)
VERSION_2_KEYWORD_INDEX = ("DROP TRIGGER IF EXISTS caption_text_add", "DROP TRIGGER IF EXISTS caption_text_drop",
                           "DROP TRIGGER IF EXISTS caption_text_set", "DROP TABLE IF EXISTS caption_text")


@dataclass
class NewScene:
    item: NewItem  # id, sha256 (of the scene: video sha256 and place), uri, metadata (with the video fields)
    index: int
    start_s: float
    end_s: float
    thumbnail: bytes
    caption: Optional[str] = None


@dataclass
class NewVideo:
    sha256: str
    uri: str
    id: str
    metadata: dict[str, str]
    duration_s: float
    sampled: int
    data: Optional[bytes] = None  # the video bytes to keep (None: indexed from a server-side file)
    every_s: Optional[float] = None  # the sampling interval (a scene's frames can be decoded again with it)


@dataclass
class SceneRow:
    vid: int
    id: str
    index: int
    start_s: float
    end_s: float
    caption: Optional[str]
    created_at: float = 0.0


@dataclass
class Video:
    id: str
    sha256: str
    uri: str
    blob: Optional[str]
    metadata: dict[str, str]
    duration_s: float
    sampled: int
    created_at: float
    every_s: Optional[float] = None  # the sampling interval (None: stored before it was kept)
    scenes: list[SceneRow] = field(default_factory=list)


@dataclass
class VideoOutcome:
    id: str
    sha256: str
    added: bool  # False: the video was already there under `id` (its scenes as stored)
    scenes: list[SceneRow]


class StoreError(Exception):
    """Base of the store's own errors."""


class ConflictError(StoreError):
    """An explicit id already names different content."""


class ModelMismatchError(StoreError):
    """The store holds embeddings of another model (or dimension) than the one offered."""


class ItemRejected(StoreError):
    """The store cannot hold this one item as given (a field over the store's bound); the message names the
    field and the bound. The other items of its batch are stored."""


class StoreSetupError(StoreError):
    """The store is set up otherwise than this process needs (or cannot be set up), and retrying cannot
    change that: the message says what an operator must do."""


def default_id(sha256: str) -> str:
    """Ids derived from content: the first 128 bits of its sha256, in hex."""
    return sha256[:32]


@dataclass
class NewItem:
    sha256: str
    uri: str
    embedding: np.ndarray  # (D,) float32, unit norm
    id: str = ""  # empty: default_id(sha256)
    metadata: dict[str, str] = field(default_factory=dict)
    data: Optional[bytes] = None  # the image bytes to keep (None: indexed from a server-side file)
    # added by this call to a generation another replica's switch then left (Milvus): its row in the store,
    # when there under the same id, takes this embedding (service._rewrite_landed)
    rewrite: bool = False


@dataclass
class AddOutcome:
    id: str
    sha256: str
    added: bool  # False: the content was already there under `id`
    vid: int
    created_at: float = 0.0  # when the item was stored (now, for a new one)


@dataclass
class Item:
    vid: int
    id: str
    sha256: str
    uri: str
    blob: Optional[str]
    metadata: dict[str, str]
    caption: Optional[str]
    created_at: float
    updated_at: float
    embedding: Optional[np.ndarray] = None


@dataclass
class Change:
    seq: int
    vid: int
    op: str


class Store:
    """Items, their embeddings and captions, in one SQLite database plus a blob directory."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobDirectory(self.data_dir)
        self.path = self.data_dir / "store.sqlite3"
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        if "every_s" not in {row[1] for row in self._writer.execute("PRAGMA table_info(videos)")}:
            self._writer.execute("ALTER TABLE videos ADD COLUMN every_s REAL")  # a videos table of before the column
        self._init_info()
        # blob unlinks put off while a backup copies the blobs its snapshot names (hold_blob_deletes)
        self._holds, self._held_unlinks, self._holds_lock = 0, [], threading.Lock()

    # ------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
        return conn

    def close(self) -> None:
        self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._writer)

    # ------------------------------------------------------------ store info
    def _init_info(self) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            # Names this store: an index snapshot of another store (a copied data dir) is refused.
            db.execute("INSERT OR IGNORE INTO info VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
        version = self.info().get("schema_version")
        if version in ("1", "2"):  # 2: drop its FTS5 index of captions (1 had none)
            with self._transaction() as db:
                for statement in VERSION_2_KEYWORD_INDEX:
                    db.execute(statement)
                db.execute("UPDATE info SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")

    def info(self) -> dict[str, str]:
        return dict(self._reader().execute("SELECT key, value FROM info"))

    def bind_model(self, model: str, pretrained: str, dim: int) -> None:
        """Record the model whose embeddings the store holds; refuse a different one later."""
        wanted = {"model": model, "pretrained": pretrained, "embedding_dim": str(dim)}
        with self._transaction() as db:
            have = dict(db.execute("SELECT key, value FROM info WHERE key IN ('model', 'pretrained', 'embedding_dim')"))
            if have and have != wanted:
                raise ModelMismatchError(
                    f"the store in {self.data_dir} holds embeddings of {have.get('model')} "
                    f"({have.get('pretrained')}, dim {have.get('embedding_dim')}) but the model server has "
                    f"{model} ({pretrained}, dim {dim}); use another --data directory or the same model"
                )
            db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", wanted.items())

    # ------------------------------------------------------------ blobs
    def stage_blob(self, data: bytes) -> Path:
        """Write `data` durably to a staging file (any thread); `add` places it or removes it."""
        return self.blobs.stage(data)

    def read_image(self, item: Item) -> bytes:
        """The item's encoded bytes: its blob, or the server-side file it was indexed from (BlobError if not);
        a video scene's keyframe."""
        row = self._reader().execute("SELECT thumbnail FROM scenes WHERE vid = ?", (item.vid,)).fetchone()
        return bytes(row[0]) if row else self.blobs.read_item(item)

    def sweep_blobs(self) -> int:
        """Remove staging leftovers and blobs no row names (after a crash); returns how many. Writer only."""
        return self.blobs.sweep(self._referenced_blobs)

    def _referenced_blobs(self, names: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            marks = ','.join('?' * len(chunk))
            rows = self._writer.execute(f"SELECT blob FROM items WHERE blob IN ({marks}) "
                                        f"UNION ALL SELECT blob FROM videos WHERE blob IN ({marks})", chunk + chunk)
            known.update(r[0] for r in rows)
        return known

    # ------------------------------------------------------------ writes
    def add(self, items: list[NewItem], staged: Optional[list[Optional[Path]]] = None
            ) -> list[AddOutcome | ConflictError]:
        """Insert new items in one transaction; content already present is a duplicate, not an error.

        `staged[i]` is item i's blob from `stage_blob` (or None): it is placed when the item is
        added and removed otherwise, before this returns, whatever happens. Writer thread only.
        """
        staged = list(staged) if staged is not None else [None] * len(items)
        now = time.time()
        outcomes: list[AddOutcome | ConflictError] = []
        placed: list[Path] = []
        try:
            with self._transaction() as db:
                for item, blob in zip(items, staged):
                    outcome = self._add_one(db, item, blob, now)
                    outcomes.append(outcome)
                    if isinstance(outcome, AddOutcome) and outcome.added and blob is not None:
                        placed.append(self.blobs.place(blob, item.sha256))
                fsync_dirs(placed)  # the renames are durable before the rows that name them commit
        except BaseException:
            for path in placed:  # rolled back: nothing names them
                discard(path)
            raise
        finally:
            for blob in staged:
                discard(blob)
        return outcomes

    def _add_one(self, db: sqlite3.Connection, item: NewItem, blob: Optional[Path], now: float
                 ) -> AddOutcome | ConflictError:
        row = db.execute("SELECT vid, id, created_at FROM items WHERE sha256 = ?", (item.sha256,)).fetchone()
        if row is not None:
            return AddOutcome(id=row[1], sha256=item.sha256, added=False, vid=row[0], created_at=row[2])
        item_id = item.id or default_id(item.sha256)
        if _id_taken(db, item_id):
            return ConflictError(f"id {item_id!r} already names other content")
        embedding = np.ascontiguousarray(item.embedding, dtype=np.float32)
        blob_name = self.blobs.relative(item.sha256) if blob is not None else None
        vid = db.execute(
            "INSERT INTO items (id, sha256, uri, blob, metadata, embedding, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (item_id, item.sha256, item.uri, blob_name, json.dumps(item.metadata, sort_keys=True),
             embedding.tobytes(), now, now),
        ).lastrowid
        db.executemany("INSERT INTO item_meta VALUES (?, ?, ?)", [(k, v, vid) for k, v in item.metadata.items()])
        db.execute("INSERT INTO changes (vid, op) VALUES (?, 'add')", (vid,))
        return AddOutcome(id=item_id, sha256=item.sha256, added=True, vid=vid, created_at=now)

    def delete(self, item_id: str) -> Optional[Item]:
        """Remove an item (row, metadata, its blob); returns what was removed, None if unknown."""
        with self._transaction() as db:
            item = self._get(db, "id", item_id, with_embedding=False)
            if item is None:
                return None
            db.execute("DELETE FROM items WHERE vid = ?", (item.vid,))
            db.execute("DELETE FROM item_meta WHERE vid = ?", (item.vid,))
            db.execute("DELETE FROM caption_retry WHERE vid = ?", (item.vid,))
            db.execute("DELETE FROM scenes WHERE vid = ?", (item.vid,))
            db.execute("INSERT INTO changes (vid, op) VALUES (?, 'delete')", (item.vid,))
        if item.blob:  # after the commit: a crash in between leaves an unreferenced blob, never a dangling row
            self._unlink_blob(item.blob)
        return item

    # ------------------------------------------------------------ videos
    def add_video(self, video: NewVideo, scenes: list[NewScene], staged: Optional[Path] = None
                  ) -> VideoOutcome | ConflictError:
        """The video row, its blob (`staged`, placed or removed before this returns) and its scenes (items with
        their captions, and `scenes` rows) in one transaction: all of it or none. Writer thread only."""
        now = time.time()
        placed: Optional[Path] = None
        try:
            with self._transaction() as db:
                known = db.execute("SELECT id FROM videos WHERE sha256 = ?", (video.sha256,)).fetchone()
                if known is not None:
                    return VideoOutcome(known[0], video.sha256, False, self._scene_rows(db, known[0]))
                video_id = video.id or default_id(video.sha256)
                taken = next((i for i in [video_id, *(s.item.id for s in scenes)] if _id_taken(db, i)), None)
                if taken is not None:
                    return ConflictError(f"id {taken!r} already names other content")
                blob_name = self.blobs.relative(video.sha256) if staged is not None else None
                db.execute("INSERT INTO videos (id, sha256, uri, blob, metadata, duration_s, sampled, created_at, every_s) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (video_id, video.sha256, video.uri, blob_name, json.dumps(video.metadata, sort_keys=True),
                            video.duration_s, video.sampled, now, video.every_s))
                rows = [self._add_scene(db, scene, video_id, now) for scene in scenes]
                if staged is not None:
                    placed = self.blobs.place(staged, video.sha256)
                    fsync_dirs([placed])  # durable before the row that names it commits
            return VideoOutcome(video_id, video.sha256, True, rows)
        except BaseException:
            discard(placed)  # rolled back: nothing names it
            raise
        finally:
            discard(staged)

    def _add_scene(self, db: sqlite3.Connection, scene: NewScene, video_id: str, now: float) -> SceneRow:
        outcome = self._add_one(db, scene.item, None, now)
        if not isinstance(outcome, AddOutcome) or not outcome.added:  # ids and hashes were checked: cannot happen
            raise StoreError(f"scene {scene.item.id!r} could not be added: {outcome}")
        if scene.caption is not None:
            db.execute("UPDATE items SET caption = ? WHERE vid = ?", (scene.caption, outcome.vid))
        db.execute("INSERT INTO scenes VALUES (?, ?, ?, ?, ?, ?)",
                   (outcome.vid, video_id, scene.index, scene.start_s, scene.end_s, scene.thumbnail))
        return SceneRow(outcome.vid, outcome.id, scene.index, scene.start_s, scene.end_s, scene.caption, now)

    def delete_video(self, video_id: str) -> Optional[tuple[Video, list[Item]]]:
        """Remove a video, its scenes (items, metadata, rows) and its blob in one transaction; returns what was
        removed, None if unknown."""
        with self._transaction() as db:
            video = self._video(db, "id", video_id)
            if video is None:
                return None
            vids = [scene.vid for scene in video.scenes]
            removed = list(self._items_of(db, vids).values())
            for table in ("items", "item_meta", "caption_retry", "scenes"):
                db.executemany(f"DELETE FROM {table} WHERE vid = ?", [(vid,) for vid in vids])
            db.executemany("INSERT INTO changes (vid, op) VALUES (?, 'delete')", [(vid,) for vid in vids])
            db.execute("DELETE FROM videos WHERE id = ?", (video_id,))
        if video.blob:  # after the commit, as for images
            self._unlink_blob(video.blob)
        return video, removed

    def get_video(self, video_id: str) -> Optional[Video]:
        return self._video(self._reader(), "id", video_id)

    def find_video_sha(self, sha256: str) -> Optional[Video]:
        return self._video(self._reader(), "sha256", sha256)

    def read_video(self, video: Video) -> bytes:
        """The video's bytes: its blob, or the server-side file it was indexed from (BlobError if not)."""
        return self.blobs.read_item(video)

    def video_file(self, video: Video) -> Path:
        """The file holding the video's bytes (read a slice at a time: a video may be gigabytes)."""
        return self.blobs.item_path(video)

    def _video(self, db, column: str, value: str) -> Optional[Video]:
        row = db.execute(f"SELECT id, sha256, uri, blob, metadata, duration_s, sampled, created_at, every_s FROM videos "
                         f"WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            return None
        return Video(*row[:4], json.loads(row[4]), *row[5:], scenes=self._scene_rows(db, row[0]))

    @staticmethod
    def _scene_rows(db, video_id: str) -> list[SceneRow]:
        return [SceneRow(*row) for row in db.execute(
            "SELECT s.vid, i.id, s.idx, s.start_s, s.end_s, i.caption, i.created_at FROM scenes s "
            "JOIN items i ON i.vid = s.vid WHERE s.video_id = ? ORDER BY s.idx", (video_id,))]

    def _items_of(self, db, vids: list[int], with_embedding: bool = False) -> dict[int, Item]:
        out: dict[int, Item] = {}
        columns = self._COLUMNS + (", embedding" if with_embedding else "")
        for start in range(0, len(vids), 500):
            chunk = vids[start:start + 500]
            for row in db.execute(f"SELECT {columns} FROM items WHERE vid IN ({','.join('?' * len(chunk))})", chunk):
                out[row[0]] = _item(row)
        return out

    def video_count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM videos").fetchone()[0]

    def _unlink_blob(self, relative: str) -> None:
        with self._holds_lock:
            if self._holds:
                self._held_unlinks.append(relative)
                return
        self.blobs.unlink(relative)

    # ------------------------------------------------------------ backups (search_service/backup.py)
    def hold_blob_deletes(self) -> None:
        """Put off deletes' blob unlinks until `release_blob_deletes`: a backup's snapshot may name a blob
        that a later delete would otherwise remove before the backup copied it. Any thread; call before
        the snapshot is taken. A crash meanwhile leaves unreferenced blobs, which `sweep_blobs` removes."""
        with self._holds_lock:
            self._holds += 1

    def release_blob_deletes(self) -> int:
        """End one hold; the last one unlinks the blobs put off that no row names now (the same content may
        have been added again meanwhile). Writer thread only (placing a blob runs there). Returns how many."""
        with self._holds_lock:
            self._holds -= 1
            if self._holds:
                return 0
            held, self._held_unlinks = self._held_unlinks, []
        known = self._referenced_blobs(held) if held else set()
        return sum(discard(self.blobs.path(name)) for name in set(held) - known)

    def backup_database(self, target: Path) -> None:
        """Copy the database as of one moment into `target` (a new file) with SQLite's online backup API,
        in one step: a read transaction, so writers go on meanwhile (WAL) and the copy is consistent."""
        source = self._connect()
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            source.backup(copy)  # pages=-1: all pages under one read lock
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            copy.close()
            source.close()

    def set_captions(self, captions: dict[str, str]) -> None:
        """Captions by item id (ids deleted meanwhile are skipped)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("UPDATE items SET caption = ?, updated_at = ? WHERE id = ?",
                           [(text, now, item_id) for item_id, text in captions.items()])
            db.executemany("DELETE FROM caption_retry WHERE vid = (SELECT vid FROM items WHERE id = ?)",
                           [(item_id,) for item_id in captions])

    # ------------------------------------------------------------ caption retries (caption_retry.RetryBook)
    def add_caption_retries(self, failures: dict[str, str], next_at: float) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO caption_retry (vid, next_at, error) "
                           "SELECT vid, ?, ? FROM items WHERE id = ? AND caption IS NULL",
                           [(next_at, error, item_id) for item_id, error in failures.items()])

    def captions_due(self, now: float, limit: int) -> list[tuple[str, int, float, str]]:
        """(item id, retries, next_at, error) of the entries due at `now`, the longest waiting first."""
        return self._reader().execute(
            "SELECT i.id, r.retries, r.next_at, r.error FROM caption_retry r JOIN items i ON i.vid = r.vid "
            "WHERE r.given_up = 0 AND r.next_at <= ? ORDER BY r.next_at LIMIT ?", (now, limit)).fetchall()

    def caption_retry_failed(self, item_id: str, retries: int, error: str, next_at: Optional[float]) -> None:
        with self._transaction() as db:
            db.execute("UPDATE caption_retry SET retries = ?, error = ?, next_at = coalesce(?, next_at), given_up = ? "
                       "WHERE vid = (SELECT vid FROM items WHERE id = ?)",
                       (retries, error, next_at, int(next_at is None), item_id))

    def caption_retry_done(self, item_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM caption_retry WHERE vid = (SELECT vid FROM items WHERE id = ?)", (item_id,))

    def caption_retry_counts(self) -> tuple[int, int]:
        """(pending, given up)."""
        row = self._reader().execute("SELECT count(*) - coalesce(sum(given_up), 0), coalesce(sum(given_up), 0) "
                                     "FROM caption_retry").fetchone()
        return int(row[0]), int(row[1])

    def store_uuid(self) -> str:
        return self.info()["store_uuid"]

    def prune_changes(self, upto_seq: int) -> None:
        """Forget changes a durable snapshot already covers (AUTOINCREMENT keeps counting).

        `pruned_seq` remembers how far: a snapshot older than that (say, of another
        index type) can no longer be caught up and must be rebuilt.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))
            db.execute("INSERT OR REPLACE INTO info VALUES ('pruned_seq', ?)", (str(upto_seq),))

    def pruned_seq(self) -> int:
        return int(self.info().get("pruned_seq", 0))

    # ------------------------------------------------------------ reads
    _COLUMNS = "vid, id, sha256, uri, blob, metadata, caption, created_at, updated_at"

    def _get(self, db, column: str, value, with_embedding: bool) -> Optional[Item]:
        columns = self._COLUMNS + (", embedding" if with_embedding else "")
        row = db.execute(f"SELECT {columns} FROM items WHERE {column} = ?", (value,)).fetchone()
        return _item(row) if row else None

    def get(self, item_id: str, with_embedding: bool = False) -> Optional[Item]:
        return self._get(self._reader(), "id", item_id, with_embedding)

    def find_sha(self, sha256: str) -> Optional[Item]:
        return self._get(self._reader(), "sha256", sha256, False)

    def get_many(self, vids: list[int], with_embedding: bool = False) -> dict[int, Item]:
        return self._items_of(self._reader(), vids, with_embedding)

    def count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM items").fetchone()[0]

    def captioned(self) -> int:
        return self._reader().execute("SELECT count(*) FROM items WHERE caption IS NOT NULL").fetchone()[0]

    def last_seq(self) -> int:
        row = self._reader().execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0

    def item_texts(self, with_metadata: bool = True) -> Iterator[tuple[int, str, Optional[str], dict[str, str]]]:
        """(vid, id, caption, metadata) of every item (the keyword index's documents); with_metadata=False: of
        the captioned items only, metadata {} (no JSON read: when no text fields are declared)."""
        if not with_metadata:
            for vid, item_id, caption in self._reader().execute(
                    "SELECT vid, id, caption FROM items WHERE caption IS NOT NULL"):
                yield vid, item_id, caption, {}
            return
        for vid, item_id, caption, metadata in self._reader().execute(
                "SELECT vid, id, caption, metadata FROM items ORDER BY vid"):
            yield vid, item_id, caption, json.loads(metadata)

    def item_times(self) -> Iterator[tuple[int, float]]:
        """(vid, created_at) of every item, in vid order (the filter index's live items and added_at)."""
        yield from self._reader().execute("SELECT vid, created_at FROM items ORDER BY vid")

    def metadata_rows(self) -> Iterator[tuple[int, str, str]]:
        """(vid, key, value) of every item's metadata, in vid order (for the in-memory filter index)."""
        yield from self._reader().execute("SELECT vid, key, value FROM item_meta ORDER BY vid")

    def embeddings(self, vids: Optional[list[int]] = None, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vids, embeddings (n, D)) in chunks: all items in vid order, or just `vids`."""
        db = self._reader()
        if vids is None:
            cursor = db.execute("SELECT vid, embedding FROM items ORDER BY vid")
            while rows := cursor.fetchmany(batch):
                yield _stack(rows)
            return
        for start in range(0, len(vids), 500):
            chunk = vids[start:start + 500]
            rows = db.execute(f"SELECT vid, embedding FROM items WHERE vid IN ({','.join('?' * len(chunk))})",
                              chunk).fetchall()
            if rows:
                yield _stack(rows)

    def snapshot_view(self) -> "_Transaction":
        """A read transaction: everything read inside it sees one consistent state."""
        return _Transaction(self._reader(), read_only=True)

    def changes_after(self, seq: int) -> list[Change]:
        rows = self._reader().execute("SELECT seq, vid, op FROM changes WHERE seq > ? ORDER BY seq", (seq,))
        return [Change(*r) for r in rows]



def _id_taken(db: sqlite3.Connection, item_id: str) -> bool:
    """Whether an item or a video has this id (they share one name space: Get and Delete take either)."""
    return db.execute("SELECT 1 FROM items WHERE id = ? UNION ALL SELECT 1 FROM videos WHERE id = ?",
                      (item_id, item_id)).fetchone() is not None


def _stack(rows) -> tuple[np.ndarray, np.ndarray]:
    vids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return vids, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])


def _item(row) -> Item:
    item = Item(vid=row[0], id=row[1], sha256=row[2], uri=row[3], blob=row[4], metadata=json.loads(row[5]),
                caption=row[6], created_at=row[7], updated_at=row[8])
    if len(row) > 9:
        item.embedding = np.frombuffer(row[9], dtype=np.float32).copy()
    return item


class _Transaction:
    """BEGIN IMMEDIATE (writes) or BEGIN (reads) ... COMMIT, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection, read_only: bool = False):
        self.conn = conn
        self.read_only = read_only

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, exc, tb):
        self.conn.execute("ROLLBACK" if kind is not None else "COMMIT")
        return False
