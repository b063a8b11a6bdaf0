"""Load: concurrent clients on 127.0.0.1 run bounded loops of mixed ingest / search / caption calls for a
fixed time. No unexpected errors; the RSS of the search service and of tritonserver (with its
Python-backend stub processes) stays bounded; p50/p99 latencies per operation are recorded."""
from __future__ import annotations

import random
import threading
import time

import grpc
import numpy as np
import pytest

from .conftest import RssSampler, needs_triton, short, unique_jpegs

pytestmark = needs_triton


@pytest.mark.parametrize("clients,seconds", [pytest.param(4, 15, id="4x15s", marks=short),
                                             pytest.param(16, 120, id="16x120s", marks=pytest.mark.long)])
def test_mixed_load_holds(clients, seconds, shared_service, live_triton, figures):
    from search_service.testing import WireClient
    from search_service.pb import search_pb2 as pb

    with WireClient(shared_service.address, timeout=60) as client:  # something to search from the start
        seed_ids = [r.id for r in client.add_images(pb.AddImageRequest(image=i) for i in unique_jpegs(7000, 8))]
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(n: int):
        rng = random.Random(n)
        known = list(seed_ids)
        batch = 0
        with WireClient(shared_service.address, timeout=60) as c:
            while time.monotonic() < deadline:
                op = rng.choices(["ingest", "search_text", "search_captions", "search_image", "caption", "get"],
                                 weights=[3, 4, 1, 2, 1, 2])[0]
                started = time.perf_counter()
                try:
                    if op == "ingest":
                        # new images in every run of this test in one session (the service is shared)
                        images = unique_jpegs(10_000_000 * clients + 100_000 * (n + 1) + batch, 4)
                        batch += 1
                        results = list(c.add_images(pb.AddImageRequest(image=i, metadata={"client": str(n)})
                                                    for i in images))
                        assert all(r.outcome == pb.AddImageResult.ADDED for r in results), results
                        known.extend(r.id for r in results)
                    elif op == "search_text":
                        assert c.search_text(rng.choice(["a cat", "a red car", "coffee"]), k=10).hits
                    elif op == "search_captions":
                        hits = c.search_text("a photo", k=2, with_captions=True).hits
                        assert all(h.caption for h in hits), hits
                    elif op == "search_image":
                        item = rng.choice(known)
                        assert c.search_image(id=item, k=5).hits[0].id == item
                    elif op == "caption":
                        assert c.caption(id=rng.choice(known), max_tokens=8).text is not None
                    else:
                        assert c.get(rng.choice(known)).id
                except (grpc.RpcError, AssertionError) as exc:
                    with lock:
                        errors.append(f"{op}: {exc!r}"[:300])
                    continue
                with lock:
                    latencies.setdefault(op, []).append(time.perf_counter() - started)

    def pids():
        return [shared_service.proc.pid, *live_triton.process_group_members()]

    service_pid = shared_service.proc.pid
    with RssSampler(lambda: [service_pid]) as service_rss, RssSampler(lambda: live_triton.process_group_members()) as triton_rss:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
    assert errors == [], errors[:10]
    assert shared_service.proc.poll() is None and live_triton.is_alive()
    with WireClient(shared_service.address, timeout=60) as client:
        stats = client.stats()
        assert stats.count == stats.indexed
    s_mb = np.array(service_rss.values()) / 2**20
    t_mb = np.array(triton_rss.values()) / 2**20
    # Bounded: after the first quarter (warm-up: first batches, caches), RSS grows by less than 300 MB.
    for name, mb in (("service", s_mb), ("triton", t_mb)):
        quarter = mb[: max(1, len(mb) // 4)]
        assert mb.max() - quarter.max() < 300, f"{name} RSS grew from {quarter.max():.0f} to {mb.max():.0f} MB"
    everything = np.concatenate([np.array(v) for v in latencies.values()]) * 1000
    figures.record(f"load: {clients} clients x {seconds} s", operations=int(everything.size), unexpected_errors=0,
                   ops_per_s=round(everything.size / seconds, 1),
                   p50_ms=round(float(np.percentile(everything, 50)), 1),
                   p99_ms=round(float(np.percentile(everything, 99)), 1),
                   **{f"{op}_p50_p99_ms": f"{np.percentile(np.array(v) * 1000, 50):.0f} / "
                      f"{np.percentile(np.array(v) * 1000, 99):.0f} (n={len(v)})" for op, v in sorted(latencies.items())},
                   service_rss_mb_min_max=f"{s_mb.min():.0f} / {s_mb.max():.0f}",
                   triton_rss_mb_min_max=f"{t_mb.min():.0f} / {t_mb.max():.0f} (server + stubs)",
                   items_after=int(stats.count))
