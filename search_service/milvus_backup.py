"""Back up a Milvus collection while it serves, verify such a backup, restore it into a new collection.

A backup folder (the embedded store's is search_service/backup.py; the blobs and the manifest's rules are
the same, and so is incremental copying: a second backup into the folder copies only new blobs)::

    manifest.json              written last (atomically): a folder without one is an incomplete backup
    items-<stamp>.parquet      one row per item, as the collection stores it: pk (content sha256), item_id,
                               uri, blob (its copy here, or "" for an item indexed from a server-side file),
                               meta (the JSON value as text), caption, created_at, updated_at, embedding
    captions-<stamp>.parquet   the rows of `<collection>_captions` made for those items
    blobs/ab/<sha256>          the image bytes, named by their content's sha256

The manifest records the item count, each file's sha256, the model identity the collection is bound to
and its index (type, metric, build parameters): a restore builds the same.

Consistency under write load: the backup begins with a Strong read (count) of the collection, so Milvus
has applied every write acknowledged before the backup began; then pymilvus's query iterator reads
every row in primary-key order, page by page, each page at least as new as that read. So every item
acknowledged before the backup began and not deleted while it ran is in it; an item deleted before it
began is not. Writes made while it runs may or may not be: Milvus 2.3 gives an iterator no snapshot
timestamp (pymilvus: "failed to get mvccTs from milvus server"), so it is not one moment's copy. An
item deleted after its row was read and before its blob was copied is left out (its row is read again
at Strong: gone); one deleted and added again meanwhile is backed up as it is now.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .backup import (MILVUS_FORMAT, STAGING, BackupError, BackupSummary, BlobMissing, Progress, begin_backup,
                     blobs_present, building_folder, check_blob, check_files, check_new_folder, copy_blob,
                     finish_backup, load_manifest, one_at_a_time, place, put_in_place, restore_file,
                     sync_filesystem)
from .collection import StoreUnavailable
from .milvus import ROW_FIELDS, SCHEMA_VERSION, MilvusCollection, MilvusSettings, MAX_META_JSON_BYTES
from .store import StoreError

PAGE = 500  # rows per query iterator page, per Parquet row group and per insert on restore (~1 MB at dim 512)
CAPTION_FIELDS = ["pk", "caption", "item_created_at", "updated_at"]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def blob_name(sha256: str) -> str:
    """Where a backup keeps an item's bytes (the embedded backup's layout)."""
    return f"blobs/{sha256[:2]}/{sha256}"


def items_schema(dim: int):
    import pyarrow as pa

    return pa.schema([("pk", pa.string()), ("item_id", pa.string()), ("uri", pa.string()), ("blob", pa.string()),
                      ("meta", pa.string()), ("caption", pa.string()), ("created_at", pa.float64()),
                      ("updated_at", pa.float64()), ("embedding", pa.list_(pa.float32(), dim))])


def captions_schema():
    import pyarrow as pa

    return pa.schema([("pk", pa.string()), ("caption", pa.string()), ("item_created_at", pa.float64()),
                      ("updated_at", pa.float64())])


# ---------------------------------------------------------------- backup
def backup_collection(collection: MilvusCollection, out: Path, progress: Optional[Progress] = None) -> BackupSummary:
    """Back the collection up into `out` (created, or a previous backup to update incrementally)."""
    with one_at_a_time(collection.blobs.root.resolve()):
        return _backup(collection, Path(out), progress or _no_progress)


def backup_named_collection(settings, data: Path, out: Path, progress: Optional[Progress] = None) -> BackupSummary:
    """`coca backup --collection NAME`, no service needed: the collection the Milvus at settings.uri holds under
    that name (the generation it answers from), its blobs read from `data` (the replicas' --data). Replicas may
    serve it meanwhile: as through the Backup RPC, the backup holds every write acknowledged before it began."""
    collection = MilvusCollection(data, settings)
    try:
        identity = collection.identity()
        if identity is None:
            raise BackupError(f"the Milvus collection {settings.collection!r} does not exist")
        dim = int(identity["embedding_dim"])
        collection.bind_model(identity["model"], identity["pretrained"], dim)
        collection.open_index(dim)  # (loaded, as a replica loads it: a Strong count needs that)
        return backup_collection(collection, out, progress)
    finally:
        collection.close()


def _backup(collection: MilvusCollection, out: Path, progress: Progress) -> BackupSummary:
    started = time.perf_counter()
    identity = collection.identity()
    if identity is None:
        raise BackupError(f"the Milvus collection {collection.name!r} does not exist")
    previous, staging, stamp = begin_backup(collection.blobs.root, out)
    total = collection.strong_count()  # from here on, reads see every write acknowledged before the backup began
    have = blobs_present(out, previous)
    export = _Export(collection, out, staging, have)
    items_file, captions_file = f"items-{stamp}.parquet", f"captions-{stamp}.parquet"
    created = export.items(staging / items_file, int(identity["embedding_dim"]), total, progress)
    captions = export.captions(staging / captions_file, created)
    sync_filesystem(out)  # one flush for all the blobs
    files = {name: place(staging / name, out / name) for name in (items_file, captions_file)}
    manifest = {
        "format": MILVUS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema_version": SCHEMA_VERSION, "collection": collection.name, "items": len(created),
        "captions": captions, "items_file": items_file, "captions_file": captions_file,
        "model": {key: str(identity.get(key, "")) for key in ("model", "pretrained", "embedding_dim")},
        "index": collection.index_settings(), "files": files,
        "blobs": {"count": len(export.blobs), "named_by": "the sha256 of each one's bytes"},
    }
    finish_backup(out, manifest, export.blobs)
    return BackupSummary(str(out), len(created), len(export.blobs), export.copied, export.written + sum(
        entry["bytes"] for entry in files.values()), 0, time.perf_counter() - started)


class _Export:
    """Rows read through the query iterator into Parquet, their blobs copied beside (those not there yet)."""

    def __init__(self, collection: MilvusCollection, out: Path, staging: Path, have: set[str]):
        self.collection, self.out, self.staging, self.have = collection, out, staging, have
        self.blobs: list[str] = []  # blobs the backup names
        self.copied = self.written = 0

    def items(self, path: Path, dim: int, total: int, progress: Progress) -> dict[str, float]:
        """Write the items' file; each exported item's pk -> created_at (which caption rows apply)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        created: dict[str, float] = {}
        schema = items_schema(dim)
        with pq.ParquetWriter(path, schema) as writer:
            for page in self.collection.pages(False, ROW_FIELDS + ["embedding"], PAGE):
                rows = [kept for kept in map(self._with_blob, page) if kept is not None]
                created.update((row["pk"], row["created_at"]) for row in rows)
                writer.write_table(pa.Table.from_pylist([_item_record(row, dim) for row in rows], schema))
                progress("items", len(created), max(total, len(created)))
        return created

    def _with_blob(self, row: dict) -> Optional[dict]:
        """The row with its blob copied here (its `blob` then names the copy); None for an item deleted since
        its row was read."""
        if not row["blob"]:
            row["backup_blob"] = ""
            return row
        name = blob_name(row["pk"])
        if name not in self.have:
            source = self.collection.blobs.path(row["blob"])
            try:
                self.written += copy_blob(source, self.out / name, self.staging, row["pk"])
            except BlobMissing:
                now = self.collection.row_now(row["pk"])  # deleted meanwhile, or deleted and added again?
                if now is not None and now["blob"] == row["blob"]:
                    raise
                return None if now is None else self._with_blob({**now, "embedding": row["embedding"]})
            self.copied += 1
            self.have.add(name)
        self.blobs.append(name)
        row["backup_blob"] = name
        return row

    def captions(self, path: Path, created: dict[str, float]) -> int:
        """Write the caption rows made for the exported items (an orphan's is never read: left out)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        count = 0
        with pq.ParquetWriter(path, captions_schema()) as writer:
            for page in self.collection.pages(True, CAPTION_FIELDS, PAGE):
                rows = [{field: row[field] for field in CAPTION_FIELDS} for row in page
                        if created.get(row["pk"]) == row["item_created_at"]]
                writer.write_table(pa.Table.from_pylist(rows, captions_schema()))
                count += len(rows)
        return count


def _item_record(row: dict, dim: int) -> dict:
    embedding = np.asarray(row["embedding"], np.float32)
    if embedding.shape != (dim,):
        raise BackupError(f"item {row['item_id']!r}: an embedding of {embedding.shape} values, the collection's "
                          f"dimension is {dim}")
    return {"pk": row["pk"], "item_id": row["item_id"], "uri": row["uri"], "blob": row["backup_blob"],
            "meta": json.dumps(row["meta"] or {}, ensure_ascii=False), "caption": row["caption"] or "",
            "created_at": row["created_at"], "updated_at": row["updated_at"], "embedding": embedding}


# ---------------------------------------------------------------- verify
def read_items(folder: Path, manifest: dict, columns: Optional[list[str]] = None):
    """The items' table (those columns), BackupError when it cannot be read."""
    return _read(folder / manifest["items_file"], columns)


def _read(path: Path, columns: Optional[list[str]] = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BackupError(f"{path.name}: not a readable Parquet file of this backup ({exc})") from None


def _batches(path: Path) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PAGE):
            yield batch.to_pylist()
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise BackupError(f"{path.name}: not a readable Parquet file of this backup ({exc})") from None


def verify_items(folder: Path, manifest: dict, progress: Progress = _no_progress) -> None:
    """After check_files: the items' count and fields, every blob an item names present with its sha256."""
    table = read_items(folder, manifest, ["pk", "blob", "embedding"])
    dim = int(manifest["model"]["embedding_dim"])
    if table.num_rows != manifest["items"]:
        raise BackupError(f"{manifest['items_file']}: {table.num_rows} items, the manifest says {manifest['items']}")
    if table.schema.field("embedding").type.list_size != dim:
        raise BackupError(f"{manifest['items_file']}: embeddings of another dimension than the model's {dim}")
    blobs = [(pk, name) for pk, name in zip(table.column("pk").to_pylist(), table.column("blob").to_pylist()) if name]
    if len(blobs) != manifest["blobs"]["count"]:
        raise BackupError(f"{manifest['items_file']}: {len(blobs)} items name blobs, the manifest says "
                          f"{manifest['blobs']['count']}")
    for done, (pk, name) in enumerate(blobs, 1):
        _check_blob_name(pk, name, manifest["items_file"])
        check_blob(folder, name)
        progress("verify", done, len(blobs))
    _read(folder / manifest["captions_file"])


def _check_blob_name(pk: str, name: str, source: str) -> None:
    """An item's blob is read from disk: only ever blobs/ab/<its sha256> inside the folder."""
    if name != blob_name(pk) or len(pk) != 64 or not all(c in "0123456789abcdef" for c in pk):
        raise BackupError(f"{source}: an item names the blob {name[:100]!r}, not blobs/ab/<its sha256>")


# ---------------------------------------------------------------- restore
def restore_collection(folder: Path, data: Path, settings: MilvusSettings,
                       progress: Progress = _no_progress) -> dict:
    """Restore a Milvus backup into a new collection (`settings.collection`: absent, or present and empty) with
    the backup's index, its blobs into the new blob directory `data` (absent or empty; built beside it and
    renamed into place at the end). Returns the manifest. What Milvus refuses or cannot do is BackupError."""
    from pymilvus.exceptions import MilvusException

    try:
        return _restore(Path(folder), Path(data), settings, progress)
    except (StoreUnavailable, StoreError, MilvusException) as exc:
        raise BackupError(f"restore into the Milvus collection {settings.collection!r}: {exc}") from None


def _restore(folder: Path, data: Path, settings: MilvusSettings, progress: Progress) -> dict:
    check_new_folder(data)
    manifest = load_manifest(folder)
    if manifest["format"] != MILVUS_FORMAT:
        raise BackupError(f"{folder}: a backup of an embedded store: restore it with coca restore DIR --data NEW "
                          "(no --collection)")
    check_files(folder, manifest)
    verify_items(folder, manifest)  # the whole backup first: a damaged one leaves no half-filled collection
    settings = _with_index(settings, manifest["index"])
    probe = MilvusCollection(data, settings)
    try:
        rows = probe.stored_rows()
    finally:
        probe.close()
    if rows:
        raise BackupError(f"the Milvus collection {settings.collection!r} exists and holds {rows} rows: restore into "
                          "a new collection (drop it first, or name another --collection)")
    building = building_folder(data)
    collection = MilvusCollection(building, settings)
    try:
        model = manifest["model"]
        collection.bind_model(model["model"], model["pretrained"], int(model["embedding_dim"]))
        collection.open_index(int(model["embedding_dim"]))
        _restore_items(folder, manifest, collection, building, progress)
        for page in _batches(folder / manifest["captions_file"]):
            collection.insert_rows([{**row, "marker": [0.0, 0.0]} for row in page], captions=True)
        count = collection.strong_count()
        if count != manifest["items"]:
            raise BackupError(f"the Milvus collection {settings.collection!r} holds {count} items after the restore, "
                              f"the backup {manifest['items']}: was something else writing to it?")
        put_in_place(building, data)
    except BaseException:
        import shutil

        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        collection.close()
    return manifest


def _restore_items(folder: Path, manifest: dict, collection: MilvusCollection, building: Path,
                   progress: Progress) -> None:
    done = 0
    for page in _batches(folder / manifest["items_file"]):
        rows = [_restored_row(folder, manifest, collection, building, record) for record in page]
        collection.insert_rows(rows)
        done += len(rows)
        progress("restore", done, manifest["items"])


def _restored_row(folder: Path, manifest: dict, collection: MilvusCollection, building: Path, record: dict) -> dict:
    """A collection row from a backup record; its blob copied (checked) under a new name, as `add` names one."""
    import secrets

    blob = ""
    if record["blob"]:
        _check_blob_name(record["pk"], record["blob"], manifest["items_file"])
        blob = collection.blobs.relative(f"{record['pk']}.{secrets.token_hex(6)}")
        restore_file(folder / record["blob"], building / blob, building / STAGING, record["pk"], record["blob"],
                     durable=False)
    try:
        meta = json.loads(record["meta"])
    except ValueError:
        meta = None
    if len(record["meta"].encode()) > MAX_META_JSON_BYTES or not isinstance(meta, dict):
        raise BackupError(f"{manifest['items_file']}: item {record['item_id']!r} has metadata that is no JSON object "
                          "within Milvus's bound")
    return {"pk": record["pk"], "item_id": record["item_id"], "uri": record["uri"], "blob": blob, "meta": meta,
            "caption": record["caption"], "created_at": record["created_at"], "updated_at": record["updated_at"],
            "embedding": np.asarray(record["embedding"], np.float32).tolist()}


def _with_index(settings: MilvusSettings, index: dict) -> MilvusSettings:
    """The settings with the backup's index type and build parameters (a replica checks them when it binds)."""
    import dataclasses

    params = index.get("params", {})
    return dataclasses.replace(
        settings, index_type=index["index_type"], hnsw_m=int(params.get("M", settings.hnsw_m)),
        ef_construction=int(params.get("efConstruction", settings.ef_construction)),
        nlist=int(params.get("nlist", settings.nlist)))
