"""Crash safety: SIGKILL the search service at random points of a streamed ingest, and a process
in the middle of an index snapshot write.

After every kill the service is started again on the same data directory: every acknowledged item
is there exactly once (sending it again is a DUPLICATE), the store and FAISS hold the same ids,
and searches work. A snapshot write killed at a random point leaves the old snapshot or the new
one, never a torn file.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from .conftest import needs_triton, service_args, short, unique_jpegs

ROOT = str(Path(__file__).resolve().parents[2])
# The long runs check what survived each kill, with no time bound: make test-reliability's untimed lane.
LONG_KILLS = [pytest.mark.long, pytest.mark.untimed]
ROUNDS = [pytest.param(3, id="3-kills", marks=short), pytest.param(20, id="20-kills", marks=LONG_KILLS)]


def index_matches_store(data_dir) -> dict:
    """Open the data directory the way the service does (snapshot + catch-up) and compare FAISS with SQLite."""
    from search_service.engine import Engine
    from search_service.index import IndexSettings

    engine = Engine(data_dir, IndexSettings())
    try:
        how = engine.open_index(engine.dim)
        vids = np.concatenate([v for v, _ in engine.store.embeddings()] or [np.zeros(0, np.int64)])
        live = engine.index.ids().tolist()
        assert len(live) == len(set(live)), "an id is twice in FAISS"
        assert live == sorted(vids.tolist()), "FAISS and SQLite hold different ids"
        assert engine.store.count() == len(vids) == len(live)
        return {"count": len(vids), "opened": how}
    finally:
        engine.close()


@needs_triton
@pytest.mark.parametrize("rounds", ROUNDS)
def test_sigkill_during_streamed_ingest_loses_nothing(rounds, tmp_path, live_triton, exported, figures):
    from search_service.testing import WireClient
    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess

    rng = random.Random(1234 + rounds)
    data = tmp_path / "data"
    acked: dict[str, bytes] = {}  # id -> image, every item the service acknowledged
    sent = 0
    restart_s = []
    for round_ in range(rounds):
        started = time.monotonic()
        service = ServiceProcess(data, live_triton.grpc_url, *service_args(exported)).start()
        restart_s.append(time.monotonic() - started)
        try:
            with WireClient(service.address, timeout=60) as client:
                # The previous round's acknowledged items survived, exactly once, and are searchable.
                stats = client.stats()
                assert stats.count == stats.indexed, stats
                assert stats.count >= len(acked)
                for item_id in rng.sample(sorted(acked), min(5, len(acked))):
                    assert client.get(item_id).id == item_id
                    assert client.search_image(id=item_id, k=1).hits[0].id == item_id
                if acked:
                    again = list(client.add_images(pb.AddImageRequest(image=img) for img in list(acked.values())[-3:]))
                    assert all(r.outcome == pb.AddImageResult.DUPLICATE for r in again), again
                    assert client.stats().count == stats.count
                # Stream new images; SIGKILL at a random moment (sometimes before the first result).
                images = unique_jpegs(seed=round_, count=120)
                sent += len(images)
                delay = rng.uniform(0.05, 2.5)
                killer = threading.Timer(delay, lambda: service.proc.send_signal(signal.SIGKILL))
                killer.start()
                try:
                    for result in client.add_images(pb.AddImageRequest(image=img) for img in images):
                        assert result.outcome == pb.AddImageResult.ADDED, result
                        acked[result.id] = images[result.index]
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
                killer.join()
        finally:
            service.kill()
        assert service.proc.returncode == -signal.SIGKILL, f"round {round_}: the stream ended before the kill"

    # After the last kill: everything acknowledged is in the store, and opening the data directory the
    # way the service does gives an index equal to the store. (The long run also restarts the service.)
    if rounds > 3:
        with ServiceProcess(data, live_triton.grpc_url, *service_args(exported)) as service, \
                WireClient(service.address, timeout=60) as client:
            stats = client.stats()
            assert stats.count == stats.indexed
            assert [i for i in acked if _missing(client, i)] == []
            assert len(client.search_text("a photo", k=10).hits) == min(10, stats.count)
    from search_service.store import Store

    store = Store(data)
    try:
        assert [i for i in acked if store.get(i) is None] == []
    finally:
        store.close()
    check = index_matches_store(data)
    figures.record(f"crash: SIGKILL during AddImages ({rounds} kills)", kills=rounds, images_sent=sent,
                   acknowledged=len(acked), stored=check["count"],
                   stored_unacknowledged=check["count"] - len(acked), acknowledged_lost=0,
                   faiss_equals_sqlite=True, restart_s_max=round(max(restart_s), 2))


def _missing(client, item_id: str) -> bool:
    try:
        return client.get(item_id).id != item_id
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return True
        raise


# ---------------------------------------------------------------- snapshot writes
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from search_service.index import IndexSettings, VectorIndex

    path, seq = sys.argv[1], int(sys.argv[2])
    vectors = np.random.default_rng(0).standard_normal((BLOCK * 5, 64)).astype(np.float32)
    while True:
        seq += 1
        index = VectorIndex(64, IndexSettings())
        n = blocks(seq) * BLOCK
        index.add(np.arange(n), vectors[:n], seq)
        print(f"writing {seq}", flush=True)
        index.save(path, "store-uuid")
        print(f"wrote {seq}", flush=True)
""")
BLOCK = 20_000


def blocks(seq: int) -> int:
    """How many blocks of vectors the snapshot at `seq` holds (1..5, so consecutive ones differ)."""
    return seq % 5 + 1


WRITER = f"BLOCK = {BLOCK}\n" + __import__("inspect").getsource(blocks) + WRITER



def read_snapshot(path):
    from search_service.index import IndexSettings, VectorIndex

    index = VectorIndex.load(path, IndexSettings(), "store-uuid", 64)
    return index.seq, index.size


@pytest.mark.parametrize("kills", [pytest.param(6, id="6-kills", marks=short), pytest.param(40, id="40-kills", marks=LONG_KILLS)])
def test_sigkill_during_snapshot_write_leaves_old_or_new(kills, tmp_path, figures):
    """A child process writes snapshots in a loop (seq n holds blocks(n) x 20,000 vectors of 64-d);
    SIGKILL it at a random moment. The file on disk is then the last one completed or the one being
    written, whole, and loads."""
    path = tmp_path / "index.faiss"
    rng = random.Random(7)
    outcomes = {"old": 0, "new": 0, "mid_write": 0}
    for _ in range(kills):
        start_seq = read_snapshot(path)[0] if path.exists() else 0
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start_seq)], stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any(l.startswith("writing") for l in list(lines)) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join(5)
        wrote = [int(l.split()[1]) for l in lines if l.startswith("wrote")]
        writing = [int(l.split()[1]) for l in lines if l.startswith("writing")]
        assert writing, f"the writer never started: {lines}"
        old = wrote[-1] if wrote else start_seq
        outcomes["mid_write"] += writing[-1] not in wrote
        seq, size = read_snapshot(path) if path.exists() else (None, None)
        assert seq in (old, writing[-1]) or (seq is None and old == 0), (seq, old, writing[-1])
        if seq is not None:
            assert size == blocks(seq) * BLOCK, "snapshot content does not match its header"
            outcomes["old" if seq == old else "new"] += 1
    figures.record(f"crash: SIGKILL during snapshot write ({kills} kills)", kills=kills,
                   killed_mid_write=outcomes["mid_write"], loaded_old=outcomes["old"],
                   loaded_new=outcomes["new"], torn=0)
