"""Back up an embedded store while it serves, verify a backup, restore one into a new data directory.

A backup folder::

    manifest.json                 written last (atomically): a folder without one is an incomplete backup
    store-<stamp>.sqlite3         the database as of one moment (SQLite's online backup API)
    index-<type>.faiss            the FAISS snapshot, when the data directory had one (derived: see below)
    blobs/ab/<sha256>             the image bytes the database names; a blob's name is its content's sha256

Consistency under write load: the database copy is one read transaction, so it holds exactly the commits
made before it began (every write acknowledged before the backup started). Blobs are copied after it,
only those its rows name; deletes committed meanwhile put off their unlinks until the copy is done
(Store.hold_blob_deletes), so every named blob is still there to copy, and each copy is checked against
its name. The blobs are flushed to disk together (one syncfs) before the manifest is written.
Incremental: a blob already in the folder that its previous manifest's database names is not copied
again, so a second backup into the same folder copies only the new blobs; blobs and database files
the new manifest no longer names are removed after it is written. Until then the previous manifest and
every file it names stay untouched: a backup killed at any point leaves the folder's previous backup
verifiable (or, for the first one, no manifest).

The FAISS snapshot is copied before the database, so it never covers changes the database copy lacks;
on restore the service loads it and replays the later changes from the database's change log, or
rebuilds it from the database when it cannot (another index type, the log pruned past it): it is derived
data, a shortcut for the restored service's start.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from coca.errors import CocaError

from .blobs import fsync_dir
from .store import SCHEMA_VERSION, Store

MANIFEST = "manifest.json"
FORMAT = "coca-search-backup/1"
MILVUS_FORMAT = "coca-search-milvus-backup/1"  # a Milvus collection's (search_service/milvus_backup.py)
# what a backup writes beside its manifest and blobs/ (either format: one folder may hold one, then the other)
BACKUP_FILES = ("store-*.sqlite3", "index-*.faiss", "items-*.parquet", "captions-*.parquet")
STAGING = ".staging"  # partial copies; never named by a manifest, cleared by the next backup
CHUNK = 1 << 20
BLOB_NAME = re.compile(r"blobs/([0-9a-f]{2})/\1[0-9a-f]{62}")  # BlobDirectory.relative of a sha256

# (phase, done, total): "blobs", "verify", "restore"; a progress bar's feed
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


class BackupError(CocaError):
    """A backup, verification or restore that cannot go on; the message names the first fault (the CLI
    prints it on one line and exits 2)."""


@dataclass
class BackupSummary:
    out: str
    items: int
    blobs: int  # blobs the backup names
    blobs_copied: int  # of those, copied by this run (the rest were already in the folder)
    bytes_copied: int  # all files this run wrote
    sequence: int  # the store's change sequence the backup covers
    seconds: float


# ---------------------------------------------------------------- backup
def backup_store(store: Store, out: Path, index_files: Iterable[Path] = (), progress: Optional[Progress] = None,
                 release: Optional[Callable[[], int]] = None) -> BackupSummary:
    """Back `store` up into `out` (created, or a previous backup to update incrementally).

    `index_files`: FAISS snapshots to include. `release`: how to end the blob-delete hold (the engine runs
    Store.release_blob_deletes on its writer thread; offline, the store's own method)."""
    with one_at_a_time(store.data_dir):
        return _backup(store, Path(out), index_files, progress or _no_progress, release or store.release_blob_deletes)


_running: set[Path] = set()  # data directories this process is backing up
_running_lock = threading.Lock()


@contextlib.contextmanager
def one_at_a_time(data_dir: Path):
    with _running_lock:
        if data_dir in _running:
            raise BackupError("another backup of this store is running; wait until it has finished")
        _running.add(data_dir)
    try:
        yield
    finally:
        with _running_lock:
            _running.discard(data_dir)


def _backup(store: Store, out: Path, index_files: Iterable[Path], progress: Progress,
            release: Callable[[], int]) -> BackupSummary:
    started = time.perf_counter()
    previous, staging, stamp = begin_backup(store.data_dir, out)
    files: dict[str, dict] = {}
    written = 0
    for index_file in index_files:  # before the database: the snapshot never runs ahead of it
        with contextlib.suppress(FileNotFoundError):  # none yet, or replaced meanwhile by a newer one: skipped
            files[index_file.name] = _copy_file(index_file, out / index_file.name, staging)
            written += files[index_file.name]["bytes"]
    database = f"store-{stamp}.sqlite3"
    store.hold_blob_deletes()
    try:
        staged_db = staging / database
        store.backup_database(staged_db)
        contents = read_contents(staged_db)
        have = blobs_present(out, previous)
        missing = [name for name in contents.blobs if name not in have]
        for done, name in enumerate(missing, 1):
            written += copy_blob(store.blobs.path(name), out / name, staging)
            progress("blobs", done, len(missing))
        sync_filesystem(out)  # one flush for all the blobs (an fsync each would cost more than the copying)
    finally:
        release()
    files[database] = place(staged_db, out / database)
    written += files[database]["bytes"]
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "database": database, "schema_version": contents.info.get("schema_version", ""),
        "store_uuid": contents.info.get("store_uuid", ""), "sequence": contents.sequence, "items": contents.items,
        "model": {key: contents.info.get(key, "") for key in ("model", "pretrained", "embedding_dim")},
        "files": files, "blobs": {"count": len(contents.blobs), "named_by": "the sha256 of each one's bytes"},
    }
    finish_backup(out, manifest, contents.blobs)
    return BackupSummary(str(out), contents.items, len(contents.blobs), len(missing), written, contents.sequence,
                         time.perf_counter() - started)


def backup_data_dir(data: Path, out: Path, progress: Progress = _no_progress) -> BackupSummary:
    """Offline: back up a data directory no service has open (with one open, back up through it:
    `coca backup --server`; this process could not hold the service's blob deletes)."""
    data = Path(data)
    if not (data / "store.sqlite3").is_file():
        raise BackupError(f"{data}: no store.sqlite3 in it: not a data directory of the service")
    store = Store(data)
    try:
        return backup_store(store, out, sorted(data.glob("index-*.faiss")), progress)
    finally:
        store.close()


def begin_backup(data_dir: Path, out: Path) -> tuple[Optional[dict], Path, str]:
    """Check the folder, clear its staging area: (its previous backup's manifest or None, the staging folder,
    a stamp naming this run's files)."""
    _check_out(data_dir, out)
    previous = _previous_manifest(out)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return previous, staging, time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"


def _check_out(data_dir: Path, out: Path) -> None:
    data = data_dir.resolve()
    target = out.resolve()
    if target == data or target.is_relative_to(data) or data.is_relative_to(target):
        raise BackupError(f"{out}: a backup folder must lie outside the data directory (and not contain it)")
    if target.exists() and not target.is_dir():
        raise BackupError(f"{out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists() \
            and not (target / STAGING).exists():
        raise BackupError(f"{out}: a folder that holds other files; give an empty or new folder, or a previous backup")
    target.mkdir(parents=True, exist_ok=True)


def _previous_manifest(out: Path) -> Optional[dict]:
    try:
        return load_manifest(out)
    except BackupError:
        return None


def blobs_present(out: Path, previous: Optional[dict]) -> set[str]:
    """Blobs a previous finished backup in `out` holds: named by it and on disk. (Its blobs were flushed
    before its manifest was written; leftovers of an interrupted run may not be: copied again.)"""
    if previous is None:
        return set()
    try:
        named = named_blobs(out, previous)
    except BackupError:
        return set()
    return _blob_files(out).intersection(named)


def named_blobs(folder: Path, manifest: dict) -> list[str]:
    """The blobs a backup's items name (paths relative to its folder), in either format."""
    if manifest["format"] == MILVUS_FORMAT:
        from .milvus_backup import read_items

        return [name for name in read_items(folder, manifest, ["blob"]).column("blob").to_pylist() if name]
    return read_contents(folder / manifest["database"]).blobs


def _blob_files(out: Path) -> set[str]:
    present = set()
    with contextlib.suppress(FileNotFoundError):
        for folder in os.scandir(out / "blobs"):
            present.update(f"blobs/{folder.name}/{entry.name}" for entry in os.scandir(folder.path))
    return present


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the file system holding `path` (Linux syncfs; elsewhere sync)."""
    libc_syncfs = _syncfs()
    if libc_syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc_syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs failed on {path}")
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _syncfs():
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


@dataclass
class Contents:
    items: int
    sequence: int
    info: dict[str, str]
    blobs: list[str]  # the blobs its rows name (paths relative to the folder), in vid order


def read_contents(database: Path) -> Contents:
    """What a backup's database holds: item count, change sequence, store info, the blobs its rows name."""
    if not database.is_file():
        raise BackupError(f"{database.name}: missing")
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        items = db.execute("SELECT count(*) FROM items").fetchone()[0]
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        info = dict(db.execute("SELECT key, value FROM info"))
        blobs = [name for (name,) in db.execute("SELECT blob FROM items WHERE blob IS NOT NULL ORDER BY vid")]
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'videos'").fetchone():  # stores since videos
            blobs += [name for (name,) in db.execute("SELECT blob FROM videos WHERE blob IS NOT NULL ORDER BY id")]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{database.name}: not a readable store database ({exc})") from None
    finally:
        db.close()
    wrong = next((name for name in blobs if not BLOB_NAME.fullmatch(name)), None)
    if wrong is not None:  # read from disk: never a path outside the folder
        raise BackupError(f"{database.name}: an item names the blob {wrong[:100]!r}, not a blobs/ab/<sha256> path")
    return Contents(items, row[0] if row else 0, info, blobs)


class BlobMissing(BackupError):
    """A blob an item names is not in the data directory."""


def copy_blob(source: Path, target: Path, staging: Path, sha256: Optional[str] = None) -> int:
    """Copy one blob, checking its bytes against `sha256` (default: its name); a changed or missing blob is
    a fault of the data directory, named (BlobMissing when it is not there)."""
    try:
        copied = _copy_file(source, target, staging, durable=False)
    except FileNotFoundError:
        raise BlobMissing(f"the data directory lacks the blob {source.name} that an item names") from None
    if copied["sha256"] != (sha256 or source.name):
        target.unlink(missing_ok=True)
        raise BackupError(f"the data directory's blob {source.name} does not hold the bytes its item says "
                          f"(sha256 {copied['sha256']}): the data directory is damaged")
    return copied["bytes"]


def _copy_file(source: Path, target: Path, staging: Path, durable: bool = True) -> dict:
    """Copy through a staging file renamed into place (durable: fsynced before, and its folder after;
    otherwise the caller flushes many at once); the copy's sha256 and size."""
    with open(source, "rb") as src:  # opened once: a snapshot replaced meanwhile is read whole, as it was
        tmp = staging / f"{target.name}.tmp"
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            if durable:
                os.fsync(dst.fileno())
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    if durable:
        fsync_dir(target.parent)
    return {"sha256": digest.hexdigest(), "bytes": size}


def place(staged: Path, target: Path) -> dict:
    entry = {"sha256": file_sha256(staged), "bytes": staged.stat().st_size}
    os.replace(staged, target)
    fsync_dir(target.parent)
    return entry


def finish_backup(out: Path, manifest: dict, blobs: list[str]) -> None:
    """Write the manifest (the moment the backup exists), then remove what it no longer names."""
    _write_manifest(out, manifest)
    _remove_unnamed(out, manifest, blobs)
    shutil.rmtree(out / STAGING, ignore_errors=True)


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / STAGING / MANIFEST
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)  # the moment the backup exists
    fsync_dir(out)


def _remove_unnamed(out: Path, manifest: dict, blobs: list[str]) -> None:
    """After the new manifest: database and snapshot files it does not name (the previous backup's, or an
    interrupted run's), and blobs of items deleted since."""
    for pattern in BACKUP_FILES:
        for path in out.glob(pattern):
            if path.name not in manifest["files"]:
                path.unlink(missing_ok=True)
    for name in _blob_files(out) - set(blobs):
        (out / name).unlink(missing_ok=True)


class BackupRunning(CocaError):
    """A Backup call while the service's backup is still running (ABORTED: ask again once it has finished)."""


class BackupThread:
    """The service's backups: on one thread of their own, so minutes of copying never take the shared worker
    threads that searches, Get and AddImages run on; one at a time (a second call is refused at once, not
    queued behind the first). A backup a client stopped listening to goes on until it has finished."""

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="backup")
        self._running: Optional[asyncio.Future] = None

    def start(self, job: Callable[[], BackupSummary]) -> asyncio.Future:
        """Run `job` on the backup thread; BackupRunning while an earlier one has not finished."""
        if self._running is not None and not self._running.done():
            raise BackupRunning("a backup is running; ask again once it has finished")
        self._running = asyncio.get_running_loop().run_in_executor(self._executor, job)
        return self._running

    def close(self) -> None:
        self._executor.shutdown(wait=False)


# ---------------------------------------------------------------- verify
def load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BackupError(f"{folder}: no {MANIFEST}: not a backup, or an incomplete one (interrupted before it "
                          "finished)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, MILVUS_FORMAT):
        raise BackupError(f"{path}: not a manifest of these formats ({FORMAT}, {MILVUS_FORMAT})")
    schema = SCHEMA_VERSION if manifest["format"] == FORMAT else milvus_schema_version()
    if manifest.get("schema_version") != schema:
        raise BackupError(f"{path}: schema version {manifest.get('schema_version')!r}, "
                          f"this code reads {schema}")
    for name in manifest["files"]:
        _check_name(name)
    return manifest


def milvus_schema_version():
    from .milvus import SCHEMA_VERSION as MILVUS_SCHEMA

    return MILVUS_SCHEMA


def _check_name(name: str) -> None:
    """A manifest names files inside its folder only (it is read from disk: never trusted to name others)."""
    if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or name.startswith("."):
        raise BackupError(f"{MANIFEST} names {name!r}, not a file of the backup folder")


def verify_backup(folder: Path, progress: Progress = _no_progress) -> dict:
    """Check every file's sha256, SQLite's integrity_check, every named blob present with the bytes its name
    says; returns the manifest. BackupError names the first fault."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    check_files(folder, manifest)
    if manifest["format"] == MILVUS_FORMAT:
        from .milvus_backup import verify_items

        verify_items(folder, manifest, progress)
        return manifest
    database = folder / manifest["database"]
    check = _integrity(database)
    if check != "ok":
        raise BackupError(f"{manifest['database']}: SQLite integrity_check says {check}")
    contents = read_contents(database)
    if (contents.items, len(contents.blobs)) != (manifest["items"], manifest["blobs"]["count"]):
        raise BackupError(f"{manifest['database']}: {contents.items} items and {len(contents.blobs)} blobs, the "
                          f"manifest says {manifest['items']} and {manifest['blobs']['count']}")
    for done, name in enumerate(contents.blobs, 1):
        check_blob(folder, name)
        progress("verify", done, len(contents.blobs))
    return manifest


def check_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest names is there with its sha256."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BackupError(f"{name}: missing")
        if file_sha256(path) != entry["sha256"]:
            raise BackupError(f"{name}: sha256 differs from the manifest's (the file is damaged)")


def check_blob(folder: Path, name: str) -> None:
    path = folder / name
    if not path.is_file():
        raise BackupError(f"{name}: missing (an item names it)")
    if file_sha256(path) != path.name:
        raise BackupError(f"{name}: its bytes do not match its name (the file is damaged)")


def _integrity(database: Path) -> str:
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- restore
def restore_backup(folder: Path, data: Path, progress: Progress = _no_progress) -> dict:
    """Copy a backup into a new data directory `data` (absent or empty), checking every file's hash as it
    is copied; built beside it and renamed into place at the end, so a failed restore leaves no half data
    directory. Returns the manifest."""
    folder, data = Path(folder), Path(data)
    check_new_folder(data)
    manifest = load_manifest(folder)
    if manifest["format"] == MILVUS_FORMAT:
        raise BackupError(f"{folder}: a backup of the Milvus collection {manifest['collection']!r}: restore it into "
                          "a new collection (coca restore DIR --data NEW --milvus-uri URI --collection NAME)")
    building = building_folder(data)
    try:
        for name, entry in manifest["files"].items():
            target = building / ("store.sqlite3" if name == manifest["database"] else name)
            restore_file(folder / name, target, building / STAGING, entry["sha256"], name)
        contents = read_contents(building / "store.sqlite3")
        for done, name in enumerate(contents.blobs, 1):
            restore_file(folder / name, building / name, building / STAGING, Path(name).name, name, durable=False)
            progress("restore", done, len(contents.blobs))
        put_in_place(building, data)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest


def check_new_folder(data: Path) -> None:
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise BackupError(f"{data}: not empty; restore into a new or empty folder")


def building_folder(data: Path) -> Path:
    """Where a restore builds `data` (beside it, renamed into place at the end: put_in_place)."""
    building = data.with_name(f".{data.name}.restoring")
    shutil.rmtree(building, ignore_errors=True)
    (building / STAGING).mkdir(parents=True)
    return building


def put_in_place(building: Path, data: Path) -> None:
    sync_filesystem(building)
    (building / STAGING).rmdir()
    if data.exists():
        data.rmdir()
    os.replace(building, data)
    fsync_dir(data.parent)


def restore_file(source: Path, target: Path, staging: Path, sha256: str, name: str, durable: bool = True) -> None:
    try:
        copied = _copy_file(source, target, staging, durable)
    except FileNotFoundError:
        raise BackupError(f"{name}: missing from the backup") from None
    if copied["sha256"] != sha256:
        raise BackupError(f"{name}: sha256 differs from the backup's record (the file is damaged)")


def summary_dict(summary: BackupSummary) -> dict:
    return asdict(summary)
