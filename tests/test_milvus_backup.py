"""Backup and restore of a Milvus collection (search_service/milvus_backup.py), against real parts: the
session's Milvus standalone, a real tritonserver (coca-tiny, random weights), the service in its own process.

The oracles: what the client was told was stored before the backup began (bytes and metadata sent,
the embedding and caption the source service held), exact search over the restored items."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from clients.coca_client import AddItem
from serving.testing import triton_unavailable_reason
from search_service.backup import verify_backup
from search_service.testing import ServiceProcess, wait_for

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from tests.test_backup import assert_search_is_exact, cli, client_of, noise_jpegs, run_backup  # noqa: E402


@pytest.fixture(scope="module")
def triton(plain_triton):
    return plain_triton


def milvus_service(data, triton, milvus_server, collection: str, *extra: str) -> ServiceProcess:
    return ServiceProcess(data, triton.grpc_url, "--vector-store", "milvus", "--milvus-uri", milvus_server.uri,
                          "--collection", collection, *extra)


def test_a_backup_taken_during_ingest_restores_into_a_new_collection_every_item_acknowledged_before_it(
        tmp_path, triton, milvus_server, capsys):
    source, target = f"bk_source_{time.time_ns()}", f"bk_restored_{time.time_ns()}"
    backups = tmp_path / "backups"
    first, during = noise_jpegs(30, seed=21), noise_jpegs(300, seed=22)
    sent: dict[str, tuple[bytes, dict]] = {}  # id -> (bytes, metadata) of every add acknowledged
    adds: list[tuple[str, float, float]] = []  # (id, started, acknowledged): time.monotonic()
    stop = threading.Event()

    with milvus_service(tmp_path / "data", triton, milvus_server, source, "--backup-root", str(backups)) as service, \
            client_of(service) as client:
        items = [AddItem(image=data, metadata={"n": str(i), "note": "ünï 😀"}, caption=i < 3)
                 for i, data in enumerate(first)]
        for item, result in zip(items, client.add(items)):
            sent[result.id] = (item.image, item.metadata)
            adds.append((result.id, 0.0, 0.0))
        deleted = list(sent)[-2:]  # deleted before the backup: must not come back
        for item_id in deleted:
            client.delete(item_id)

        def ingest():  # one image a call: each acknowledged on its own, while the backup runs
            for i, image in enumerate(during):
                if stop.is_set():
                    return
                started, metadata = time.monotonic(), {"n": f"during-{i}"}
                (result,) = client.add([AddItem(image=image, metadata=metadata)])
                sent[result.id] = (image, metadata)
                adds.append((result.id, started, time.monotonic()))

        writer = threading.Thread(target=ingest)
        writer.start()
        try:
            wait_for(lambda: len(adds) >= len(first) + 10, 60, "ingest to be under way", interval=0.01)
            began = time.monotonic()
            summary = run_backup(client, "bk")
            ended = time.monotonic()
        finally:
            stop.set()
            writer.join()
        in_flight = {i for i, started, acked in adds if started < ended and acked > began}
        live = {i for i, _, acked in adds if acked < began} - set(deleted)
        held = {i: client.get(i, include_embedding=True) for i in live}  # as the source service holds them
        assert cli("backup", "--verify", str(backups / "bk")) == 0
        manifest = verify_backup(backups / "bk")
        assert manifest["model"]["model"] == "coca-tiny" and manifest["index"]["index_type"] == "HNSW"
        assert manifest["captions"] == 3 and manifest["items"] == summary.items >= len(live)
        assert cli("restore", str(backups / "bk"), "--data", str(tmp_path / "restored"), "--collection", target,
                   "--milvus-uri", milvus_server.uri) == 0
        assert "coca serve --vector-store milvus" in capsys.readouterr().out
        # a second backup into the folder copies only the blobs of items added since
        second = run_backup(client, "bk")
        count = client.stats().count
    assert second.items == count and second.blobs_copied == count - summary.items
    print(f"backup over {ended - began:.2f} s: {len(live)} items live when it began, {len(in_flight)} in flight")

    with milvus_service(tmp_path / "restored", triton, milvus_server, target) as restored, \
            client_of(restored) as client:
        everything = {i.id: i for i in client.iter_items(include_embeddings=True, page_size=1000)}
        assert set(everything) - in_flight == live - in_flight, "restored items differ from those live when it began"
        assert set(everything) <= set(sent) - set(deleted)
        assert len(everything) == summary.items
        for item_id, item in everything.items():
            back = client.get(item_id, include_image=True)
            assert (back.image, back.metadata) == sent[item_id]
            if item_id in held:
                np.testing.assert_allclose(item.embedding, held[item_id].embedding, atol=1e-6)
                assert back.caption == held[item_id].caption and back.created_at == held[item_id].created_at
        assert sum(bool(held[i].caption) for i in held) == 3
        assert_search_is_exact(client, everything)


def test_restore_refuses_an_existing_collection_that_holds_items(tmp_path, triton, milvus_server, capsys):
    """... and `coca backup --collection` backs the collection up with no service running."""
    from search_service.milvus_backup import read_items

    source = f"bk_refused_{time.time_ns()}"
    backups = tmp_path / "backups"
    images = noise_jpegs(5, seed=23)
    with milvus_service(tmp_path / "data", triton, milvus_server, source, "--backup-root", str(backups)) as service, \
            client_of(service) as client:
        ids = [r.id for r in client.add(images)]
        run_backup(client, "bk")
        capsys.readouterr()
        assert cli("restore", str(backups / "bk"), "--data", str(tmp_path / "new"), "--collection", source,
                   "--milvus-uri", milvus_server.uri) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"{source!r} exists and holds 5 rows" in error[0], error
        assert not (tmp_path / "new").exists()
        assert client.stats().count == 5 and {i.id for i in client.iter_items()} == set(ids)
    # a Milvus backup restored without --collection: told how
    assert cli("restore", str(backups / "bk"), "--data", str(tmp_path / "new")) == 2
    assert "--collection NAME" in capsys.readouterr().err

    offline = tmp_path / "offline"
    assert cli("backup", "--out", str(offline), "--data", str(tmp_path / "data"), "--collection", source,
               "--milvus-uri", milvus_server.uri) == 0
    items = read_items(offline, verify_backup(offline), ["pk", "item_id"]).to_pylist()
    assert {r["item_id"] for r in items} == set(ids) and len(items) == len(images)
    assert {(offline / "blobs" / r["pk"][:2] / r["pk"]).read_bytes() for r in items} == set(images)
    assert cli("backup", "--out", str(offline), "--data", str(tmp_path / "data"), "--collection", "no_such_one",
               "--milvus-uri", milvus_server.uri) == 2
    assert "'no_such_one' does not exist" in capsys.readouterr().err


def test_a_backup_begun_right_after_a_write_holds_it_and_verify_names_faults(tmp_path, milvus_server, capsys):
    """In process, no Triton: each round adds items and backs up at once (the collection's default level,
    Bounded, would read pages older than the write: the Strong read the backup begins with is what holds it)."""
    from search_service.milvus import MilvusCollection, MilvusSettings
    from search_service.milvus_backup import read_items
    from search_service.store import NewItem, sha256_hex

    settings = MilvusSettings(uri=milvus_server.uri, collection=f"bk_fresh_{time.time_ns()}", index_type="FLAT")
    collection = MilvusCollection(tmp_path / "data", settings)
    rng = np.random.default_rng(24)
    stored: dict[str, bytes] = {}
    try:
        collection.bind_model("coca-tiny", "random", 8)
        collection.open_index(8)
        for _ in range(6):
            data = [rng.bytes(300) for _ in range(3)]
            vectors = rng.normal(size=(3, 8)).astype(np.float32)
            collection.add([NewItem(sha256=sha256_hex(d), uri="", embedding=v / np.linalg.norm(v), data=d)
                            for d, v in zip(data, vectors)])
            stored.update((sha256_hex(d), d) for d in data)
            summary = collection.backup(tmp_path / "bk")
            manifest = verify_backup(tmp_path / "bk")
            assert set(read_items(tmp_path / "bk", manifest, ["pk"]).column("pk").to_pylist()) == set(stored)
            assert summary.blobs_copied == 3  # incremental: the round's new blobs only
    finally:
        collection.close()
    assert all((tmp_path / "bk" / "blobs" / sha[:2] / sha).read_bytes() == data for sha, data in stored.items())
    faults = {}
    for fault in ("flip a blob byte", "remove a blob", "flip an items file byte"):
        broken = tmp_path / fault.replace(" ", "-")
        shutil.copytree(tmp_path / "bk", broken)
        blob = broken / "blobs" / sorted(stored)[4][:2] / sorted(stored)[4]
        items = next(broken.glob("items-*.parquet"))
        if fault == "remove a blob":
            blob.unlink()
        else:
            path = blob if fault == "flip a blob byte" else items
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        assert cli("backup", "--verify", str(broken)) == 2
        faults[fault] = capsys.readouterr().err.strip().splitlines()
    assert all(len(lines) == 1 for lines in faults.values()), faults
    assert "do not match its name" in faults["flip a blob byte"][0]
    assert "missing (an item names it)" in faults["remove a blob"][0]
    assert "items-" in faults["flip an items file byte"][0] and "sha256 differs" in faults["flip an items file byte"][0]
    # a Milvus that does not answer: one line, exit 2, nothing left behind
    assert cli("restore", str(tmp_path / "bk"), "--data", str(tmp_path / "new"), "--collection", "elsewhere",
               "--milvus-uri", "http://127.0.0.1:1") == 2
    assert "unavailable" in capsys.readouterr().err and not (tmp_path / "new").exists()
