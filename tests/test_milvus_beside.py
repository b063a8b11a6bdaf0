"""The test Milvus runs beside another Milvus on the host (a user's own, another test session's): its
embedded etcd, proxy, internal and metrics ports are its own. Two servers at once, each answering a
collection round trip with its own data."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("milvus")
pymilvus = pytest.importorskip("pymilvus")


def round_trip(uri: str, name: str, vectors: np.ndarray) -> list[tuple[int, list[float]]]:
    """Create a collection on `uri`, insert `vectors` (ids 0..n-1), read them back by id (Strong)."""
    client = pymilvus.MilvusClient(uri=uri, timeout=30)
    try:
        client.create_collection(name, dimension=vectors.shape[1], consistency_level="Strong")
        client.insert(name, [{"id": i, "vector": v.tolist()} for i, v in enumerate(vectors)])
        rows = client.get(name, ids=list(range(len(vectors))), output_fields=["vector"])
        return sorted((row["id"], row["vector"]) for row in rows)
    finally:
        client.close()


def test_two_test_milvus_servers_serve_side_by_side(milvus_server, tmp_path):
    from search_service.testing import MilvusServerProcess

    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((5, 8)).astype(np.float32) for _ in range(2))
    with MilvusServerProcess(tmp_path / "beside") as beside:
        assert beside.port != milvus_server.port
        assert beside.ports["etcd_port"] != milvus_server.ports["etcd_port"]
        # The same collection name on both: each server has its own store.
        for server, vectors in [(milvus_server, first), (beside, second)]:
            got = round_trip(server.uri, "beside_round_trip", vectors)
            assert [i for i, _ in got] == list(range(len(vectors)))
            np.testing.assert_allclose(np.array([v for _, v in got]), vectors, rtol=0, atol=1e-6)
    pymilvus.MilvusClient(uri=milvus_server.uri).drop_collection("beside_round_trip")
