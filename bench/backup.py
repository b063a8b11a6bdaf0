"""Backup figures (README "Backup and restore"): a data directory of N items with random blobs, then

* `cp -r` of the data directory (the plain file copy a backup is compared with),
* a full backup (search_service/backup.py) idle, and one while a thread adds items (write load),
* an incremental backup into the same folder after 1% new items,
* restore, and the restored store's start with the backup's FAISS snapshot vs rebuilding the index.

    python -m bench.backup --items 3000 --blob-kb 50 --dim 512 [--index HNSW32] --work /tmp/backup-bench
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from search_service.backup import restore_backup, verify_backup
from search_service.engine import Engine
from search_service.index import IndexSettings
from search_service.store import NewItem, sha256_hex


def random_items(rng: np.random.Generator, count: int, blob_bytes: int, dim: int, tag: str) -> list[NewItem]:
    items = []
    for i in range(count):
        data = rng.bytes(blob_bytes)
        vector = rng.normal(size=dim).astype(np.float32)
        items.append(NewItem(sha256=sha256_hex(data), uri=f"{tag}{i}", embedding=vector / np.linalg.norm(vector),
                             data=data))
    return items


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--blob-kb", type=int, default=50)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/backup-bench"))
    p.add_argument("--index", default="Flat", help="FAISS factory of the store's index (HNSW32: a costly rebuild)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = args.work / "data"
    settings = IndexSettings(factory=args.index)
    engine = Engine(data, settings)
    engine.bind_model("bench", "random", args.dim)
    engine.open_index(args.dim)
    items = random_items(rng, args.items, args.blob_kb << 10, args.dim, "a")
    for start in range(0, len(items), 256):
        engine.add(items[start:start + 256])
    engine.snapshot()
    size = folder_bytes(data)
    print(f"data directory: {args.items} items, {size / 1e6:.1f} MB")

    _, cp_s = timed(lambda: subprocess.run(["cp", "-r", str(data), str(args.work / "cp")], check=True))
    print(f"cp -r: {cp_s:.2f} s, {size / 1e6 / cp_s:.0f} MB/s")
    _, cp_sync_s = timed(lambda: subprocess.run(["sh", "-c", f"cp -r {data} {args.work / 'cp2'} && sync -f {args.work}"],
                                                check=True))
    print(f"cp -r then sync -f (flushed, as a backup is): {cp_sync_s:.2f} s, {size / 1e6 / cp_sync_s:.0f} MB/s")
    full, full_s = timed(lambda: engine.backup(args.work / "idle"))
    print(f"backup, idle: {full_s:.2f} s, {full.bytes_copied / 1e6 / full_s:.0f} MB/s ({full.blobs_copied} blobs)")

    engine.add(random_items(rng, max(1, args.items // 100), args.blob_kb << 10, args.dim, "new"))
    incremental, incremental_s = timed(lambda: engine.backup(args.work / "idle"))
    print(f"incremental backup after 1% new items: {incremental_s:.2f} s, {incremental.blobs_copied} blobs copied")

    stop, added = threading.Event(), [0]

    def ingest():
        while not stop.is_set():
            engine.add(random_items(rng, 8, args.blob_kb << 10, args.dim, f"w{added[0]}-"))
            added[0] += 8

    writer = threading.Thread(target=ingest)
    writer.start()
    loaded, loaded_s = timed(lambda: engine.backup(args.work / "loaded"))
    stop.set()
    writer.join()
    print(f"backup under write load: {loaded_s:.2f} s, {loaded.bytes_copied / 1e6 / loaded_s:.0f} MB/s "
          f"({added[0]} items added meanwhile)")
    engine.close()

    _, verify_s = timed(lambda: verify_backup(args.work / "idle"))
    print(f"verify: {verify_s:.2f} s")
    _, restore_s = timed(lambda: restore_backup(args.work / "idle", args.work / "restored"))
    print(f"restore: {restore_s:.2f} s")
    for label, drop in (("with the backup's FAISS snapshot", False), ("rebuilding the index", True)):
        if drop:
            for snapshot in (args.work / "restored").glob("index-*.faiss"):
                snapshot.unlink()
        restored = Engine(args.work / "restored", settings)
        how, open_s = timed(lambda: restored.open_index(args.dim))
        restored.close()
        print(f"restored store opens {label}: {open_s:.2f} s ({how})")


if __name__ == "__main__":
    main()
