"""FindDuplicates is bounded and never starves the other calls: while 6 scans run (as many as the default
executor's threads on 2 cores, which the old code held, one per scan, waiting on one lock), the slowest Get
stays within max(0.5 s, 5 x the p99 of Gets timed alone just before, in the same run); the groups equal a
brute-force grouping of the stored embeddings; a scan stops at the caller's deadline; paging slices one snapshot; a collection over the bound is refused naming it."""
from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

ITEMS, CLUSTERS, COPIES = 6000, 60, 3
THRESHOLD, NEIGHBORS = 0.90625, 10  # exact in float32 (the wire type): the oracle compares the same number
BASELINE_GETS = 100  # Gets timed before the scans, in the same run: what this machine's load allows now
WORST_GET_S, BASELINE_FACTOR = 0.5, 5.0  # the slowest Get during the scans: <= max(0.5 s, 5 x the baseline's p99)


def tiny_png(i: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i >> 8) % 256, (i >> 16) % 256)).save(out, format="PNG")
    return out.getvalue()


def planted_vectors(dim: int) -> np.ndarray:
    """ITEMS unit vectors: random ones, and CLUSTERS groups of COPIES near-copies (cosine ~0.99)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((ITEMS, dim)).astype(np.float32)
    for c in range(CLUSTERS):
        base = vectors[c * COPIES]
        for j in range(1, COPIES):
            vectors[c * COPIES + j] = base + 0.1 * rng.standard_normal(dim).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def oracle_groups(ids: list[str], vectors: np.ndarray, threshold: float = THRESHOLD,
                  neighbors: int = NEIGHBORS) -> list[list[str]]:
    """Brute force: every item's `neighbors` nearest others scoring >= threshold join groups (union-find)."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argpartition(-scores, neighbors - 1, axis=1)[:, :neighbors]
    parent = list(range(len(ids)))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(ids)):
        for j in nearest[i]:
            if scores[i, j] >= threshold:
                parent[root(i)] = root(j)
    members: dict[int, list[str]] = {}
    for i in range(len(ids)):
        members.setdefault(root(i), []).append(ids[i])
    return sorted(sorted(m) for m in members.values() if len(m) > 1)


def test_find_duplicates_is_exact_bounded_and_starves_nobody(tmp_path, plain_triton):
    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess, WireClient

    grpc_url = plain_triton.grpc_url
    with ServiceProcess(tmp_path / "data", grpc_url, "--accept-embeddings",
                           "--max-duplicate-scan", str(ITEMS + 1)) as service, \
            WireClient(service.address, timeout=120) as client:
        list(client.add_images([pb.AddImageRequest(image=tiny_png(1 << 23))]))  # binds the store to the model
        stats = client.stats()
        vectors = planted_vectors(stats.embedding_dim)
        requests = (pb.AddImageRequest(image=tiny_png(i), embedding=pb.Embedding(
            values=vectors[i].tolist(), repository_id=stats.repository_id)) for i in range(ITEMS))
        results = list(client.add_images(requests, timeout=600))
        assert all(r.outcome == pb.AddImageResult.ADDED for r in results), results[:3]
        ids = [r.id for r in results]
        expected = oracle_groups(ids, vectors)
        assert len(expected) >= CLUSTERS

        # Exact: equal to the brute-force grouping (the warm-up item's random vector joins nothing).
        def all_groups(threshold=THRESHOLD, neighbors=NEIGHBORS, timeout=300):
            groups, token = [], ""
            while True:
                page = client.stub.FindDuplicates(pb.FindDuplicatesRequest(
                    threshold=threshold, neighbors=neighbors, page_size=25, page_token=token), timeout=timeout)
                groups += [sorted(g.ids) for g in page.groups]
                token = page.next_page_token
                if not token:
                    return groups, page.total_groups

        started = time.monotonic()
        groups, total = all_groups()
        scan_s = time.monotonic() - started
        assert sorted(groups) == expected and total == len(expected)

        def timed_get(n: int) -> float:
            t0 = time.monotonic()
            assert client.get(ids[n % ITEMS]).id == ids[n % ITEMS]
            return time.monotonic() - t0

        # The baseline, measured now under the machine's load as it is: Gets with nothing else running.
        baseline = [timed_get(n) for n in range(BASELINE_GETS)]
        baseline_p99 = float(np.percentile(baseline, 99))

        # 6 scans at once, each its own question (nothing cached helps), 100 neighbors each: Get keeps answering
        # (each Get takes a thread of the shared pool, which the old code's scans held, one each, for their whole
        # duration, 101 index hits per item).
        thresholds = [0.875, 0.890625, 0.90625, 0.921875, 0.9375, 0.953125]  # exact in float32
        scans_done = {}

        def scan(threshold):
            scans_done[threshold] = all_groups(threshold, neighbors=100)[0]

        scanners = [threading.Thread(target=scan, args=(t,)) for t in thresholds]
        for t in scanners:
            t.start()
        time.sleep(0.5)
        latencies = []
        while any(t.is_alive() for t in scanners):
            latencies.append(timed_get(len(latencies)))
            time.sleep(0.05)
        for t in scanners:
            t.join()
        assert sorted(scans_done) == thresholds
        for threshold, got in scans_done.items():
            assert sorted(got) == oracle_groups(ids, vectors, threshold, neighbors=100), threshold
        worst = max(latencies) if latencies else 0.0
        bound = max(WORST_GET_S, BASELINE_FACTOR * baseline_p99)
        print(f"one scan of {ITEMS + 1} items: {scan_s:.2f} s; Get alone: p99 {baseline_p99 * 1000:.0f} ms; during "
              f"6 scans: {len(latencies)} Gets, p50 {np.median(latencies) * 1000:.0f} ms, max {worst * 1000:.0f} ms "
              f"(bound {bound * 1000:.0f} ms)")
        # The old code: max 1,047 ms here (6,001 items; Get alone ~10 ms), growing with the store. The bound
        # follows the machine's load through the baseline, never below WORST_GET_S.
        assert latencies and worst <= bound

        # The deadline: a scan that cannot finish in time answers DEADLINE_EXCEEDED (at the next block).
        with pytest.raises(grpc.RpcError) as late:
            client.stub.FindDuplicates(pb.FindDuplicatesRequest(threshold=0.5, neighbors=100), timeout=0.05)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Over the bound: refused, naming it.
    with ServiceProcess(tmp_path / "data", grpc_url, "--max-duplicate-scan", "100") as service, \
            WireClient(service.address, timeout=120) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.FindDuplicates(pb.FindDuplicatesRequest(threshold=THRESHOLD))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "at most 100 items" in refused.value.details() and "--max-duplicate-scan" in refused.value.details()


def test_a_scan_stops_between_blocks_when_told():
    """The deadline check itself: find_groups asks keep_going() between blocks and stops (ScanStopped)."""
    from types import SimpleNamespace

    from search_service.duplicates import BLOCK_ROWS, ScanStopped, find_groups

    vectors = planted_vectors(16)[: BLOCK_ROWS * 3]
    items = [SimpleNamespace(id=f"i{n:05d}", embedding=v) for n, v in enumerate(vectors)]
    store = SimpleNamespace(list_items=lambda filters, order, after, limit, with_embeddings: SimpleNamespace(
        items=items, total=len(items), next_after=None))
    asked = []
    with pytest.raises(ScanStopped):
        find_groups(store, THRESHOLD, NEIGHBORS, keep_going=lambda: asked.append(1) or len(asked) < 3)
    assert len(asked) == 3  # the read, the first block, then stopped before the second block
    groups = find_groups(store, THRESHOLD, NEIGHBORS)
    assert sorted(g.ids for g in groups) == oracle_groups([i.id for i in items], vectors)
