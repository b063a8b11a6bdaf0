"""Backup figures (README "Backup and restore"): a data directory of N items with random blobs, then

* `cp -r` of the data directory (the plain file copy a backup is compared with),
* a full backup (search_service/backup.py) idle, and one while a thread adds items (write load),
* an incremental backup into the same folder after 1% new items,
* restore, and the restored store's start with the backup's FAISS snapshot vs rebuilding the index.

    python -m bench.backup --items 3000 --blob-kb 50 --dim 512 [--index HNSW32] --work /tmp/backup-bench
    python -m bench.backup --vector-store milvus [--milvus-uri URI] ...   (search_service/milvus_backup.py: a
        Milvus standalone of its own unless --milvus-uri; backup idle, incremental, verify, restore into a new
        collection)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--vector-store", choices=["faiss", "milvus"], default="faiss")
    p.add_argument("--milvus-uri", help="a running Milvus (default: start a standalone under --work)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    if args.vector_store == "milvus":
        return milvus_figures(args, rng)
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

    plain_copies(data, args.work, size)
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


def plain_copies(data: Path, work: Path, size: int) -> None:
    """The plain file copies a backup is compared with: cp -r, and cp -r flushed."""
    _, cp_s = timed(lambda: subprocess.run(["cp", "-r", str(data), str(work / "cp")], check=True))
    print(f"cp -r: {cp_s:.2f} s, {size / 1e6 / cp_s:.0f} MB/s")
    _, cp_sync_s = timed(lambda: subprocess.run(["sh", "-c", f"cp -r {data} {work / 'cp2'} && sync -f {work}"],
                                                check=True))
    print(f"cp -r then sync -f (flushed, as a backup is): {cp_sync_s:.2f} s, {size / 1e6 / cp_sync_s:.0f} MB/s")


def milvus_figures(args, rng: np.random.Generator) -> None:
    import contextlib

    from search_service.milvus import MilvusCollection, MilvusSettings
    from search_service.milvus_backup import restore_collection
    from .common import milvus_uri

    with contextlib.ExitStack() as stack:
        uri = milvus_uri(args.milvus_uri, args.work / "milvus", stack)
        settings = MilvusSettings(uri=uri, collection=f"bench_backup_{time.time_ns()}")
        collection = MilvusCollection(args.work / "data", settings)
        stack.callback(collection.close)
        collection.bind_model("bench", "random", args.dim)
        collection.open_index(args.dim)
        items = random_items(rng, args.items, args.blob_kb << 10, args.dim, "a")
        for start in range(0, len(items), 256):
            collection.add(items[start:start + 256])
        size = folder_bytes(args.work / "data")
        print(f"Milvus collection: {args.items} items, blob directory {size / 1e6:.1f} MB")
        plain_copies(args.work / "data", args.work, size)
        full, full_s = timed(lambda: collection.backup(args.work / "idle"))
        print(f"backup, idle: {full_s:.2f} s, {full.bytes_copied / 1e6 / full_s:.0f} MB/s ({full.blobs_copied} blobs)")
        collection.add(random_items(rng, max(1, args.items // 100), args.blob_kb << 10, args.dim, "new"))
        incremental, incremental_s = timed(lambda: collection.backup(args.work / "idle"))
        print(f"incremental backup after 1% new items: {incremental_s:.2f} s, {incremental.blobs_copied} blobs copied")
        _, verify_s = timed(lambda: verify_backup(args.work / "idle"))
        print(f"verify: {verify_s:.2f} s")
        target = dataclasses.replace(settings, collection=f"{settings.collection}_restored")
        _, restore_s = timed(lambda: restore_collection(args.work / "idle", args.work / "restored", target))
        print(f"restore into a new collection (indexes built, loaded, counted): {restore_s:.2f} s")
        print(json.dumps({"bench": "backup", "vector_store": "milvus", "items": args.items, "mb": round(size / 1e6, 1),
                          "backup_s": round(full_s, 2), "backup_mb_s": round(full.bytes_copied / 1e6 / full_s, 1),
                          "incremental_s": round(incremental_s, 2), "verify_s": round(verify_s, 2),
                          "restore_s": round(restore_s, 2)}))


if __name__ == "__main__":
    main()
