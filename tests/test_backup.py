"""Backup and restore of the embedded store (search_service/backup.py), against real parts: the service in
its own process with a real tritonserver (coca-tiny, random weights), real gRPC, SQLite and FAISS.

The oracles: what each client was told was stored before the backup began (bytes sent, embedding the
service held), exact search over the restored items, the files a backup wrote (inodes) and the faults
planted in a backup folder."""
from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.coca_client import Unavailable
from serving.testing import triton_unavailable_reason
from search_service.backup import BackupError, restore_backup, verify_backup
from search_service.engine import Engine
from search_service.index import IndexSettings
from search_service.pb import search_pb2 as pb
from search_service.store import NewItem, sha256_hex
from search_service.testing import ServiceProcess, WireClient, wait_for

MODEL, PRETRAINED = "coca-tiny", "random"  # conftest's tiny_repository: seed 0


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def triton(plain_triton):
    return plain_triton


def noise_jpegs(count: int, seed: int, side: int = 64) -> list[bytes]:
    """Distinct JPEGs of noise (incompressible: `side` 128 gives ~20 KB files)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def client_of(service):
    from clients.coca_client import Client

    return Client(service.address, timeout=60)


def add_all(client, images: list[bytes]) -> list[str]:
    results = list(client.add(images))
    assert all(r.id for r in results), [r.error for r in results if not r.id]
    return [r.id for r in results]


def run_backup(client, out: str):
    """The summary of a backup through the service (the last message of the stream)."""
    steps = list(client.backup(out))
    assert steps[-1].phase == "done" and steps[-1].summary is not None
    return steps[-1].summary


def blob_inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (folder / "blobs").glob("*/*")}


def assert_search_is_exact(client, everything: dict) -> None:
    """Searches by three items' ids answer as exact search over `everything` (id -> item with its embedding)."""
    ids = list(everything)
    vectors = np.stack([everything[i].embedding for i in ids])
    for query_id in ids[:: max(1, len(ids) // 3)][:3]:
        hits = client.search_image(id=query_id, k=10).hits
        scores = vectors @ everything[query_id].embedding
        best = np.argsort(-scores, kind="stable")[:10]
        np.testing.assert_allclose([h.score for h in hits], scores[best], atol=1e-5)
        assert {h.id for h in hits if h.score > scores[best[-1]] + 1e-5} == \
            {ids[j] for j in best if scores[j] > scores[best[-1]] + 1e-5}


def cli(*argv: str) -> int:
    from clients.cli import main

    return main(list(argv))


# ---------------------------------------------------------------- while serving
@pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))
def test_a_backup_taken_during_ingest_restores_exactly_the_items_live_when_it_began(tmp_path, triton, capsys):
    backups = tmp_path / "backups"
    first, during = noise_jpegs(40, seed=1), noise_jpegs(400, seed=2)
    adds: list[tuple[str, float, float]] = []  # (id, started, acknowledged): time.monotonic()
    deletes: list[tuple[str, float, float]] = []
    lock, stop = threading.Lock(), threading.Event()

    def timed(log, call, *args):
        started = time.monotonic()
        item_id = call(*args)
        with lock:
            log.append((item_id, started, time.monotonic()))

    with ServiceProcess(tmp_path / "data", triton.grpc_url, "--backup-root", str(backups)) as service, \
            client_of(service) as client:
        sent = dict(zip(add_all(client, first), first))  # id -> bytes, for every add acknowledged
        adds += [(i, 0.0, 0.0) for i in sent]
        ids = list(sent)
        for item_id in ids[:3]:  # deleted before the backup: must not come back
            timed(deletes, client.delete, item_id)

        def add_one(image):
            (result,) = client.add([image])
            sent[result.id] = image
            return result.id

        def ingest():  # one image a call: each acknowledged on its own, while the backup runs
            for image in during:
                if stop.is_set():
                    return
                timed(adds, add_one, image)

        def delete_during():  # deletes whose blob unlinks race the backup's copy of the blobs
            for item_id in ids[3:13]:
                timed(deletes, client.delete, item_id)

        writer = threading.Thread(target=ingest)
        writer.start()
        wait_for(lambda: len(adds) >= len(first) + 10, 60, "ingest to be under way", interval=0.01)
        deleter = threading.Thread(target=delete_during)
        deleter.start()
        began = time.monotonic()  # the backup's snapshot is taken between these two moments
        assert cli("backup", "--server", service.address, "--out", "bk") == 0
        ended = time.monotonic()
        stop.set()
        writer.join()
        deleter.join()
        # the oracle: live when the backup began = acknowledged adds before it, less acknowledged deletes
        # before it; an add or delete in flight while it ran (started before its end, acknowledged after its
        # start) may go either way
        in_flight = {i for log in (adds, deletes) for i, started, acked in log if started < ended and acked > began}
        live = {i for i, _, acked in adds if acked < began} - {i for i, _, acked in deletes if acked < began}
        never_deleted = set(sent) - {i for i, _, _ in deletes}
        served = {i: client.get(i, include_embedding=True).embedding for i in live & never_deleted - in_flight}
    assert "backed up" in capsys.readouterr().out
    assert cli("backup", "--verify", str(backups / "bk")) == 0
    assert cli("restore", str(backups / "bk"), "--data", str(tmp_path / "restored")) == 0
    print(f"backup over {ended - began:.2f} s: {len(live)} items live when it began, {len(in_flight)} in flight")

    with ServiceProcess(tmp_path / "restored", triton.grpc_url) as restored, client_of(restored) as client:
        everything = {i.id: i for i in client.iter_items(include_embeddings=True, page_size=1000)}
        assert set(everything) - in_flight == live - in_flight, \
            "the restored items differ from those live when the backup began"
        assert set(everything) <= live | in_flight
        for item_id in everything:  # bytes as the client sent them; embeddings as the service held them
            item = client.get(item_id, include_image=True, include_embedding=True)
            assert item.image == sent[item_id]
            if item_id in served:
                np.testing.assert_array_equal(item.embedding, served[item_id])
        assert_search_is_exact(client, everything)


@pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))
@pytest.mark.parametrize("store", ["faiss", pytest.param("milvus", marks=pytest.mark.long)])
def test_a_backup_killed_at_a_random_point_leaves_no_manifest_or_a_verifiable_backup(tmp_path, triton, store, request):
    root = tmp_path / "backups"
    rng = random.Random(22)
    images = noise_jpegs(200, seed=3, side=128)  # ~4 MB of blobs: a backup takes a while
    args = (tmp_path / "data", triton.grpc_url, "--backup-root", str(root))
    if store == "milvus":  # the Milvus collection's backup (search_service/milvus_backup.py)
        args += ("--vector-store", "milvus", "--milvus-uri", request.getfixturevalue("milvus_server").uri,
                 "--collection", f"killed_{time.time_ns()}")
    outcomes = []

    def backup_until_killed(client):
        with contextlib.suppress(Unavailable):  # the service is killed under it
            list(client.backup("bk"))

    for attempt in range(2):  # 0: a first backup killed; 1: one into a finished backup, killed
        with ServiceProcess(*args) as service, client_of(service) as client:
            if attempt == 0:
                add_all(client, images)
                duration = run_backup(client, "probe").seconds  # how long one takes here
            else:
                complete = run_backup(client, "bk")
                assert complete.blobs == len(images)
                duration = complete.seconds
                add_all(client, noise_jpegs(2, seed=10, side=128))  # 1% new items
            thread = threading.Thread(target=backup_until_killed, args=(client,), daemon=True)
            thread.start()
            wait_for(lambda: (root / "bk" / ".staging").is_dir() or not thread.is_alive(), 30, "the backup to start",
                     interval=0.001)
            delay = rng.uniform(0.0, 0.8 * duration)  # a random point of it (the RPC itself takes a moment)
            time.sleep(delay)
            service.kill()
            thread.join(30)
        print(f"backup {attempt}: killed {delay:.3f} s into a {duration:.3f} s backup")
        try:
            manifest = verify_backup(root / "bk")
            outcomes.append(f"verifiable ({manifest['items']} items)")
        except BackupError as exc:
            assert attempt == 0 and "no manifest.json" in str(exc) and "incomplete" in str(exc), exc
            outcomes.append("no manifest")
    print("after kill -9:", outcomes)
    with ServiceProcess(*args) as service, client_of(service) as client:  # a later backup finishes the folder
        summary = run_backup(client, "bk")
        count = client.stats().count
    assert summary.items == summary.blobs == len(blob_inodes(root / "bk")) == count == len(images) + 2
    assert summary.blobs_copied == count - manifest["blobs"]["count"]  # only blobs the last finished one lacked
    files = verify_backup(root / "bk")["files"]
    assert {p.name for p in (root / "bk").iterdir() if p.is_file()} == {"manifest.json", *files}  # no leftovers


def backup_status(service, out: str, token: Optional[str] = None) -> tuple[grpc.StatusCode, str]:
    """The status of a Backup call to `service` (OK once it has finished)."""
    with WireClient(service.address, token=token) as wire:
        try:
            list(wire.stub.Backup(pb.BackupRequest(out=out), metadata=wire.metadata, timeout=60))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


@pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))
def test_backups_are_off_without_a_backup_root_and_confined_to_it(tmp_path, triton):
    root, backups, token = tmp_path / "root", tmp_path / "backups", "s3cret"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.jpg").write_bytes(b"x")
    (backups / "photos").mkdir(parents=True)
    (backups / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "token").write_text(token)
    with ServiceProcess(tmp_path / "data", triton.grpc_url, "--root", str(root)) as service:
        for out in ("bk", str(root / "bk"), str(backups / "bk")):  # --root is for reading: never written
            code, message = backup_status(service, out)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "--backup-root" in message, (out, code, message)
    assert sorted(p.name for p in root.rglob("*")) == ["a.jpg", "photos"]
    assert not (backups / "bk").exists()

    with ServiceProcess(tmp_path / "data", triton.grpc_url, "--root", str(root), "--backup-root", str(backups),
                        "--token-file", str(tmp_path / "token")) as service:
        assert backup_status(service, "bk")[0] == grpc.StatusCode.UNAUTHENTICATED
        for out in (str(root / "bk"), str(tmp_path / "elsewhere"), "../elsewhere", "../root/bk"):
            assert backup_status(service, out, token)[0] == grpc.StatusCode.PERMISSION_DENIED, out
        assert backup_status(service, "", token)[0] == grpc.StatusCode.INVALID_ARGUMENT
        refused = backup_status(service, "photos", token)  # a folder of other files is not overwritten
        assert refused[0] == grpc.StatusCode.FAILED_PRECONDITION and "other files" in refused[1]
        assert backup_status(service, "bk", token)[0] == grpc.StatusCode.OK
        assert backup_status(service, str(backups / "bk2"), token)[0] == grpc.StatusCode.OK
    assert not (tmp_path / "elsewhere").exists() and sorted(p.name for p in root.rglob("*")) == ["a.jpg", "photos"]
    assert (backups / "photos" / "a.jpg").read_bytes() == b"x"
    assert verify_backup(backups / "bk")["items"] == verify_backup(backups / "bk2")["items"] == 0


def test_a_backup_root_overlapping_a_root_is_refused_at_start(tmp_path):
    from search_service.config import ServiceConfig

    for backup_root in (tmp_path / "root", tmp_path / "root" / "bk", tmp_path):
        with pytest.raises(ValueError, match="--backup-root .* overlaps --root"):
            ServiceConfig(tmp_path / "data", allowed_roots=[tmp_path / "root"], backup_root=backup_root)


@pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))
def test_a_running_backup_holds_no_search_slot_and_a_second_one_is_aborted(tmp_path, triton):
    backups = tmp_path / "backups"
    with ServiceProcess(tmp_path / "data", triton.grpc_url, "--backup-root", str(backups),
                        "--max-inflight-search", "1", "--max-queue-wait", "0") as service, \
            client_of(service) as client:
        images = noise_jpegs(5, seed=4)
        ids = add_all(client, images)
        # the backup stops at the last blob it copies until this test writes its bytes: a named pipe in its place
        blob = next((tmp_path / "data" / "blobs").glob(f"*/{sha256_hex(images[-1])}"))
        blob.unlink()
        os.mkfifo(blob)
        outcome: list = []
        first = threading.Thread(target=lambda: outcome.append(backup_status(service, "bk")))
        first.start()
        try:
            wait_for(lambda: (backups / "bk" / ".staging").is_dir(), 30, "the backup to start")
            time.sleep(0.5)  # the backup is past its snapshot, waiting on the pipe
            assert first.is_alive()
            # with the one search slot: answered at once, not RESOURCE_EXHAUSTED behind the backup
            hits = client.search_image(id=ids[0], k=2).hits
            assert hits[0].id == ids[0] and client.get(ids[1], include_image=True).image == images[1]
            code, message = backup_status(service, "bk2")
            assert code == grpc.StatusCode.ABORTED and "a backup is running" in message, (code, message)
        finally:
            pipe = os.open(blob, os.O_WRONLY | os.O_NONBLOCK)  # let it finish (ENXIO, not a hang, if it never read)
            try:
                os.write(pipe, images[-1])
            finally:
                os.close(pipe)
            first.join(60)
    assert outcome == [(grpc.StatusCode.OK, "")]
    assert verify_backup(backups / "bk")["items"] == len(images) and not (backups / "bk2").exists()


def test_a_collection_without_backups_answers_failed_precondition():
    import asyncio
    from types import SimpleNamespace

    from search_service.service import SearchServicer

    class Context:
        async def abort(self, code, message, trailing_metadata=()):
            raise grpc.aio.AbortError(f"{code.name}: {message}")

    async def call():
        servicer = SimpleNamespace(engine=object(), config=None)  # a collection without backup()
        return [m async for m in SearchServicer.Backup(servicer, pb.BackupRequest(out="bk"), Context())]

    with pytest.raises(grpc.aio.AbortError, match="FAILED_PRECONDITION: not offered by this store: backups"):
        asyncio.run(call())


# ---------------------------------------------------------------- offline: faults, incremental copies
def make_engine(data: Path, count: int, seed: int = 0) -> tuple[Engine, list[bytes]]:
    engine = Engine(data, IndexSettings())
    engine.bind_model(MODEL, PRETRAINED, 8)
    engine.open_index(8)
    return engine, add_random(engine, count, seed)


def add_random(engine: Engine, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    blobs, items = [], []
    for i in range(count):
        data = rng.bytes(500)
        vector = rng.normal(size=8).astype(np.float32)
        items.append(NewItem(sha256=sha256_hex(data), uri=f"item{seed}-{i}", embedding=vector / np.linalg.norm(vector),
                             data=data))
        blobs.append(data)
    engine.add(items)
    return blobs


def test_a_second_backup_after_one_percent_new_items_copies_only_their_blobs(tmp_path):
    engine, _ = make_engine(tmp_path / "data", 300)
    try:
        first = engine.backup(tmp_path / "bk")
        before = blob_inodes(tmp_path / "bk")
        new = add_random(engine, 3, seed=1)
        deleted = engine.delete(engine.store.get_many([1])[1].id)
        second = engine.backup(tmp_path / "bk")
    finally:
        engine.close()
    after = blob_inodes(tmp_path / "bk")
    assert (first.blobs_copied, second.blobs_copied, second.items) == (300, 3, 302)
    copied = {name for name in after if before.get(name) != after[name]}  # new files: a new inode
    assert copied == {sha256_hex(data) for data in new}
    assert deleted.sha256 not in after  # the deleted item's blob left the backup with it
    manifest = verify_backup(tmp_path / "bk")
    assert len(list((tmp_path / "bk").glob("store-*.sqlite3"))) == 1 and manifest["items"] == 302
    assert manifest["model"] == {"model": MODEL, "pretrained": PRETRAINED, "embedding_dim": "8"}


def test_verify_names_a_flipped_byte_a_missing_blob_and_a_damaged_database(tmp_path, capsys):
    engine, _ = make_engine(tmp_path / "data", 20)
    engine.close()
    assert cli("backup", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bk")) == 0
    assert cli("backup", "--verify", str(tmp_path / "bk")) == 0
    capsys.readouterr()

    def fault_after(damage) -> str:
        broken = tmp_path / f"broken-{damage.__name__}"
        shutil.copytree(tmp_path / "bk", broken)
        damage(broken)
        assert cli("backup", "--verify", str(broken)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        with pytest.raises(BackupError):  # restoring it fails too, and leaves nothing behind
            restore_backup(broken, tmp_path / f"restored-{damage.__name__}")
        assert not (tmp_path / f"restored-{damage.__name__}").exists()
        return lines[0]

    blob = sorted((tmp_path / "bk" / "blobs").glob("*/*"))[5].relative_to(tmp_path / "bk")

    def flip_a_blob_byte(folder):
        data = bytearray((folder / blob).read_bytes())
        data[100] ^= 0x01
        (folder / blob).write_bytes(bytes(data))

    def remove_a_blob(folder):
        (folder / blob).unlink()

    def flip_a_database_byte(folder):
        database = next(folder.glob("store-*.sqlite3"))
        data = bytearray(database.read_bytes())
        data[len(data) // 2] ^= 0x01
        database.write_bytes(bytes(data))

    def remove_the_manifest(folder):
        (folder / "manifest.json").unlink()

    line = fault_after(flip_a_blob_byte)
    assert str(blob) in line and "do not match its name" in line
    line = fault_after(remove_a_blob)
    assert str(blob) in line and "missing" in line
    line = fault_after(flip_a_database_byte)
    assert "store-" in line and "sha256 differs" in line
    assert "no manifest.json" in fault_after(remove_the_manifest)


def test_restore_refuses_a_folder_in_use_and_restores_equal_items(tmp_path, capsys):
    engine, blobs = make_engine(tmp_path / "data", 30)
    engine.backup(tmp_path / "bk")
    stored = engine.store.get_many(list(range(1, 31)), with_embedding=True).values()
    expected = {item.id: (item, engine.read_image(item)) for item in stored}
    engine.close()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    assert cli("restore", str(tmp_path / "bk"), "--data", str(tmp_path / "used")) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "used" / "x").read_text() == "mine"
    assert cli("restore", str(tmp_path / "bk"), "--data", str(tmp_path / "new")) == 0
    restored = Engine(tmp_path / "new", IndexSettings())
    try:
        assert restored.open_index(8).startswith("snapshot")  # the backup's FAISS snapshot was usable
        for item_id, (item, data) in expected.items():
            back = restored.get(item_id, with_embedding=True)
            assert restored.read_image(back) == data
            np.testing.assert_array_equal(back.embedding, item.embedding)
        query = expected[next(iter(expected))][0].embedding
        oracle = sorted(((float(i.embedding @ query), i.id) for i, _ in expected.values()), reverse=True)[:5]
        hits = restored.search(query, 5)
        np.testing.assert_allclose([h.score for h in hits], [s for s, _ in oracle], atol=1e-6)
    finally:
        restored.close()


def test_backup_refuses_a_data_directory_inside_it_and_names_bad_arguments(tmp_path, capsys):
    engine, _ = make_engine(tmp_path / "data", 3)
    engine.close()
    assert cli("backup", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "data" / "bk")) == 2
    assert "outside the data directory" in capsys.readouterr().err
    assert cli("backup", "--out", str(tmp_path / "bk")) == 2
    assert "--server" in capsys.readouterr().err
    assert cli("backup", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "bk")) == 2
    assert "not a data directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_deletes_during_a_backup_keep_the_blobs_its_snapshot_names_until_it_is_done(tmp_path):
    engine, blobs = make_engine(tmp_path / "data", 50)
    items = sorted(engine.store.get_many(list(range(1, 51))).values(), key=lambda item: item.vid)
    last, readded = items[-1], items[-2]  # the last blob copied; one deleted and added again meanwhile
    deleted_during = []

    def progress(phase, done, total):  # on the backup's thread, after its snapshot, before the last blob is copied
        if not deleted_during:
            deleted_during.append(engine.delete(last.id))
            engine.delete(readded.id)
            engine.add([NewItem(sha256=readded.sha256, uri="again", embedding=np.eye(8, dtype=np.float32)[0],
                                data=blobs[readded.vid - 1])])

    try:
        summary = engine.backup(tmp_path / "bk", progress)
        live_blobs = {p.name for p in (tmp_path / "data" / "blobs").glob("*/*")}
        assert engine.find_sha(readded.sha256) is not None
    finally:
        engine.close()
    assert deleted_during and summary.items == 50  # the snapshot was taken before the deletes
    restore_backup(tmp_path / "bk", tmp_path / "restored")
    restored = Engine(tmp_path / "restored", IndexSettings())
    try:
        assert restored.read_image(restored.get(last.id)) == blobs[last.vid - 1]
    finally:
        restored.close()
    assert last.sha256 not in live_blobs  # unlinked once the backup was done
    assert readded.sha256 in live_blobs  # added again meanwhile: kept
