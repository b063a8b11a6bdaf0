"""Image bytes kept by the service: files under `DIR/blobs/ab/<name>`, written so a crash never tears one.

Writing is two steps, so that the decision to keep a file can be made where the item's
row is committed: `stage` writes the bytes to a temp file under `blobs/.staging` and
fsyncs it (on any thread); `place` renames it to its final name; the caller fsyncs the
directories it placed into (`fsync_dirs`) before committing the row that names the file.
A file never named by a committed row is an orphan: `sweep` removes those (and staging
leftovers) given a way to tell which names are referenced.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobError(Exception):
    """Bytes that cannot be read back (gone, or changed since they were stored)."""


class BlobDirectory:
    """Content files under `root/blobs`, named by their callers (content-addressed names start with the sha256)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / "blobs"
        self.staging = self.dir / ".staging"

    def relative(self, name: str) -> str:
        """The path stored in an item's row: `blobs/ab/<name>`."""
        return f"blobs/{name[:2]}/{name}"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def stage(self, data: bytes) -> Path:
        """Write `data` durably to a staging file; `place` it or `discard` it."""
        self.staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.staging, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            discard(Path(tmp))
            raise
        return Path(tmp)

    def place(self, staged: Path, name: str) -> Path:
        """Rename a staged file to `blobs/ab/<name>` (atomic; replaces an orphan of the same name)."""
        final = self.path(self.relative(name))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        return final

    def read_item(self, item) -> bytes:
        """An item's bytes: its blob here, or the server-side file it was indexed from (a file:// uri),
        checked against its sha256; BlobError names the item, not server paths."""
        return read_checked(self.item_path(item), item.sha256, f"the image of item {item.id!r}")

    def item_path(self, item) -> Path:
        """Where an item's (or a video's) bytes are: its blob here, or the server-side file of its file:// uri."""
        return self.path(item.blob) if item.blob else Path(item.uri.removeprefix("file://"))

    def unlink(self, relative: str) -> None:
        discard(self.path(relative))

    def sweep(self, referenced: Callable[[list[str]], set[str]], older_than_s: float = 0.0) -> int:
        """Remove staging leftovers and files whose relative path `referenced` does not return.

        Only files older than `older_than_s` are considered (a shared directory may hold files
        another writer placed a moment ago and is about to commit). Returns how many went.
        """
        cutoff = time.time() - older_than_s if older_than_s > 0 else float("inf")
        removed = sum(discard(leftover) for leftover in _files(self.staging, cutoff))
        for folder in _files(self.dir):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            names = [self.relative(p.name) for p in _files(folder, cutoff)]
            known = referenced(names) if names else set()
            removed += sum(discard(self.path(name)) for name in names if name not in known)
        return removed


def read_checked(path: Path, sha256: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BlobError(f"{what} cannot be read ({exc.strerror})") from None
    if sha256_hex(data) != sha256:
        raise BlobError(f"{what} changed since it was indexed")
    return data


def fsync_dirs(paths: Iterable[Path]) -> None:
    for folder in {p.parent for p in paths}:
        fsync_dir(folder)


def discard(path: Optional[Path]) -> int:
    """Remove a file if it is there; 1 if removed."""
    if path is None:
        return 0
    with contextlib.suppress(OSError):
        path.unlink()
        return 1
    return 0


def _files(folder: Path, modified_before: float = float("inf")) -> list[Path]:
    """The entries of `folder` last modified before the given time (all by default); [] if it is gone."""
    out = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if modified_before == float("inf") or entry.stat().st_mtime < modified_before:
                    out.append(entry)
    return out
