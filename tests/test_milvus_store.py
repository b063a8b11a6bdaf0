"""Milvus as the vector store, past one process: replicas sharing a collection, read-your-writes, crashes.

Real parts only: the session's Milvus standalone (PyPI `milvus`, see search_service.testing), a real
tritonserver (coca-tiny), the service as real processes. The generic end-to-end suite runs on Milvus too
(tests/test_search_service.py is parametrised over both stores); this module covers what only a shared,
remote store has. Every check compares with what the clients were told was stored.
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from search_service.testing import WireClient, wait_for  # noqa: E402
from search_service.collection import Unsupported  # noqa: E402
from search_service.milvus import filter_expression  # noqa: E402
from search_service.query import Condition, Filter  # noqa: E402
from search_service.pb import search_pb2 as pb  # noqa: E402
from search_service.testing import ServiceProcess  # noqa: E402

MODEL, PRETRAINED, SEED = "coca-tiny", "random", 0
ADDED, DUPLICATE = pb.AddImageResult.ADDED, pb.AddImageResult.DUPLICATE


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.repository import ensure_repository
    from serving.testing import restartable_triton

    repository, _ = ensure_repository(tmp_path_factory.mktemp("milvus-e2e") / "repo", MODEL, PRETRAINED, SEED)
    with restartable_triton(repository) as server:
        yield server


def images(seed: int, count: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def replica(blob_dir, triton, milvus_server, collection: str, *extra: str) -> ServiceProcess:
    return ServiceProcess(blob_dir, triton.grpc_url, "--vector-store", "milvus", "--milvus-uri", milvus_server.uri,
                          "--collection", collection, *extra)


def add(client, data: list[bytes], **fields):
    return list(client.add_images(pb.AddImageRequest(image=d, **fields) for d in data))




def test_filter_values_cannot_inject_expressions():
    hostile = 'x" or meta["k"] != "'
    assert filter_expression({"k": hostile}) == '(meta["k"] == "x\\" or meta[\\"k\\"] != \\"")'
    assert filter_expression({'we"ird': "\\", "a": "ünï 😀\n"}) == '(meta["a"] == "ünï 😀\\n") and (meta["we\\"ird"] == "\\\\")'
    condition = Condition('k"]', (hostile, "b"), negate=True)
    assert filter_expression(Filter((condition,))) == 'not (meta["k\\"]"] in ["x\\" or meta[\\"k\\"] != \\"", "b"])'
    with pytest.raises(Unsupported, match="added_at only"):
        filter_expression(Filter((Condition("year", low=2000.0),)))


def test_two_replicas_share_one_collection(tmp_path, triton, milvus_server):
    """An item added through one replica is found, captioned and deleted through the other; the same bytes
    sent to both at once are one item; each replica reads its own writes at once."""
    name = f"replicas_{time.time_ns()}"
    data = images(1, 12)
    with replica(tmp_path, triton, milvus_server, name) as a, replica(tmp_path, triton, milvus_server, name) as b, \
            WireClient(a.address, timeout=60) as ca, WireClient(b.address, timeout=60) as cb:
        # read-your-writes through one replica (Session consistency): 0 misses
        misses = 0
        for image in data[:8]:
            [result] = add(ca, [image], metadata={"via": "a"})
            assert result.outcome == ADDED
            misses += ca.get(result.id).id != result.id
            misses += ca.search_image(image, k=1).hits[0].id != result.id
        assert misses == 0
        first = add(ca, data[:1])[0]
        assert first.outcome == DUPLICATE
        # found through the other replica (its view catches up within Milvus's staleness bound)
        hits = wait_for(lambda: cb.search_image(data[0], k=1).hits, 15, "replica b to see a's item")
        assert hits[0].id == first.id and abs(hits[0].score - 1.0) < 1e-4
        assert cb.get(first.id, include_image=True).image == data[0]  # the bytes, through the shared blob dir
        captioned = cb.search_image(data[0], k=1, with_captions=True).hits[0]
        assert captioned.caption
        assert wait_for(lambda: ca.get(first.id).caption, 15, "the caption through a") == captioned.caption
        # deleted through b: gone for b at once, for a within the staleness bound
        assert cb.delete(first.id).id == first.id
        with pytest.raises(grpc.RpcError) as gone:
            cb.get(first.id)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert all(h.id != first.id for h in cb.search_image(data[0], k=5).hits)
        wait_for(lambda: all(h.id != first.id for h in ca.search_image(data[0], k=5).hits), 15, "a to drop it")
        # the same new bytes through both replicas at once: one item, one id
        results = {}
        start = threading.Barrier(2)

        def send(client, key):
            start.wait()
            results[key] = add(client, data[8:12])

        threads = [threading.Thread(target=send, args=(c, k)) for c, k in ((ca, "a"), (cb, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.id for r in results["a"]] == [r.id for r in results["b"]]
        expected = {hashlib.sha256(d).hexdigest()[:32] for d in data[1:12]}
        assert wait_for(lambda: ca.stats().count == len(expected), 15, "the count") and cb.stats().count == len(expected)


def test_sigkill_of_a_replica_mid_ingest_loses_nothing_acknowledged(tmp_path, triton, milvus_server):
    name = f"sigkill_{time.time_ns()}"
    data = images(2, 150)
    acked = []
    victim = replica(tmp_path, triton, milvus_server, name).start()
    try:
        with WireClient(victim.address, timeout=60) as client:
            stream = client.add_images(pb.AddImageRequest(image=d) for d in data)
            with pytest.raises(grpc.RpcError):
                for result in stream:
                    assert result.outcome == ADDED
                    acked.append((result.id, data[result.index]))
                    if len(acked) == 30:
                        os.kill(victim.proc.pid, signal.SIGKILL)
    finally:
        victim.kill()
    assert len(acked) >= 30
    with replica(tmp_path, triton, milvus_server, name) as survivor, \
            WireClient(survivor.address, timeout=60) as client:
        for item_id, image in acked:
            assert client.get(item_id, include_image=True).image == image  # row and bytes
        for item_id, image in acked[::6]:
            assert wait_for(lambda: client.search_image(image, k=1).hits, 15, "the search")[0].id == item_id


@pytest.mark.long  # Milvus stops and reloads its collections (~2.5 min here): make test-reliability runs it
def test_milvus_down_gives_unavailable_naming_milvus_then_recovers(tmp_path, triton, milvus_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    name = f"outage_{time.time_ns()}"
    data = images(3, 3)
    with replica(tmp_path, triton, milvus_server, name) as service, WireClient(service.address, timeout=30) as client, \
            grpc.insecure_channel(service.address) as channel:
        stored = add(client, data[:2])
        check = health_pb2_grpc.HealthStub(channel).Check
        milvus_server.kill()
        try:
            for call in (lambda: client.search_text("a cat"), lambda: client.get(stored[0].id),
                         lambda: add(client, data[2:])):
                with pytest.raises(grpc.RpcError) as down:
                    call()
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "Milvus" in down.value.details()
            wait_for(lambda: check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING,
                     20, "NOT_SERVING")
        finally:
            milvus_server.start()
        # serving again once Milvus has reloaded the collection; what was acknowledged is there
        wait_for(lambda: check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING,
                 120, "SERVING")
        hits = wait_for(lambda: client.search_image(data[0], k=1).hits, 120, "search to work again")
        assert hits[0].id == stored[0].id
        assert client.get(stored[1].id, include_image=True).image == data[1]
        assert add(client, data[2:])[0].outcome == ADDED
