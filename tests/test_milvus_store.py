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
def triton(plain_triton):
    return plain_triton


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


# ---------------------------------------------------------------- writes that fail alone, deletes that stay deleted
# (issue 19) and replicas that start together (issue 20). Most drive MilvusCollection itself, the store under
# every replica, against the session's real Milvus; the first goes through the service.

DIM = 8


def unit_vectors(seed: int, count: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def new_items(seed: int, count: int, **fields) -> list:
    from search_service.store import NewItem

    vectors = unit_vectors(seed, count)
    return [NewItem(sha256=hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), uri=f"mem://{seed}/{i}",
                    embedding=vectors[i], **fields) for i in range(count)]


def store_replica(tmp_path, milvus_server, name: str, **settings):
    """One replica's view of collection `name`: its own MilvusCollection, bound and opened."""
    from search_service.milvus import MilvusCollection, MilvusSettings

    collection = MilvusCollection(tmp_path / "blobs", MilvusSettings(uri=milvus_server.uri, collection=name, **settings))
    collection.bind_model("test-model", "none", DIM)
    collection.open_index(DIM)
    return collection


def brute_force(live: dict, query: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The exact ranking over the live items {sha256: embedding}: (sha256, score), best first."""
    scored = sorted(((float(vector @ query), sha) for sha, vector in live.items()), key=lambda p: (-p[0], p[1]))
    return [(sha, score) for score, sha in scored[:k]]


def assert_ranking(hits, live: dict, query: np.ndarray, k: int) -> None:
    expected = brute_force(live, query, k)
    assert [h.item.sha256 for h in hits] == [sha for sha, _ in expected]
    assert np.allclose([h.score for h in hits], [score for _, score in expected], atol=1e-5)


def test_an_item_over_a_milvus_byte_bound_fails_alone(tmp_path, triton, milvus_server):
    """Milvus measures its bounds in UTF-8 bytes; the service's character checks pass these three: each fails
    alone with INVALID_ARGUMENT naming its field and the bound, and the rest of the batch is stored."""
    data = images(20, 6)
    bad = {1: dict(id="é" * 256), 3: dict(uri="漢" * 4096), 5: dict(metadata={f"k{i}": "v" * 4096 for i in range(17)})}
    named = {1: "id is 512 bytes", 3: "uri is 12288 bytes", 5: "metadata is"}
    good = {i: dict(id=f"fine-{i}", uri=f"ok-{i}.jpg", metadata={"n": str(i)}) for i in (0, 2, 4)}
    requests = [pb.AddImageRequest(image=d, **(bad.get(i) or good[i])) for i, d in enumerate(data)]
    with replica(tmp_path, triton, milvus_server, f"bytes_{time.time_ns()}") as service, \
            WireClient(service.address, timeout=60) as client:
        results = list(client.add_images(iter(requests)))
        for i in bad:
            assert results[i].outcome == pb.AddImageResult.FAILED, results[i]
            assert results[i].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert named[i] in results[i].error.message and "limit of" in results[i].error.message
        for i, fields in good.items():
            assert results[i].outcome == ADDED and results[i].id == fields["id"]
            item = client.get(fields["id"], include_image=True)
            assert (item.image, item.uri, dict(item.metadata)) == (data[i], fields["uri"], fields["metadata"])
            assert client.search_image(data[i], k=1).hits[0].id == fields["id"]
        assert client.stats().count == len(good)


def test_a_row_milvus_itself_refuses_fails_alone(tmp_path, milvus_server):
    """The net under the byte checks: with them off (as for a bound nothing checks yet), Milvus's own refusal
    (error 1100) of one row fails that item alone; the rest of the batch is stored and reads back equal."""
    from search_service.store import AddOutcome, ItemRejected

    collection = store_replica(tmp_path, milvus_server, f"refused_{time.time_ns()}")
    collection._limits = {}  # the checks before writing see no bound
    items = new_items(70, 4, metadata={"k": "v"})
    items[2].id = "é" * 256  # 512 bytes
    outcomes = collection.add(items)
    assert isinstance(outcomes[2], ItemRejected) and "max length (256)" in str(outcomes[2])
    for item, outcome in zip(items, outcomes):
        if item is not items[2]:
            assert isinstance(outcome, AddOutcome) and outcome.added
            stored = collection.get(outcome.id, with_embedding=True)
            assert (stored.sha256, stored.uri, stored.metadata) == (item.sha256, item.uri, item.metadata)
            assert np.array_equal(stored.embedding, item.embedding)
    assert collection.find_sha(items[2].sha256) is None


def test_a_caption_racing_a_delete_never_brings_the_item_back(tmp_path, milvus_server):
    """Two replicas: one stores captions while the other deletes. Oracle: no acknowledged delete is readable
    again anywhere (get, search, list, at Strong), and every surviving item has the caption stored for it."""
    name = f"captions_{time.time_ns()}"
    a, b = store_replica(tmp_path, milvus_server, name), store_replica(tmp_path, milvus_server, name)
    items = new_items(30, 40)
    assert all(o.added for o in a.add(items))
    ids = [o.id for o in a.add(items)]
    # the exact interleaving: b's delete lands between a's read of the item and a's caption write
    deleted = {ids[0]}
    upsert = a.client.upsert

    def delete_first(*args, **kwargs):
        a.client.upsert = upsert
        assert b.delete(ids[0]) is not None
        return upsert(*args, **kwargs)

    a.client.upsert = delete_first
    a.set_captions({ids[0]: "a caption racing its delete"})
    # and free-running: captions through a, deletes through b
    doomed = set(ids[1::2])
    captions = {item_id: f"caption of {item_id}" for item_id in ids[1:]}

    def caption_all():
        for item_id in sorted(captions, key=lambda i: hashlib.md5(i.encode()).hexdigest()):
            a.set_captions({item_id: captions[item_id]})

    def delete_doomed():
        for item_id in sorted(doomed):
            assert b.delete(item_id) is not None
            deleted.add(item_id)

    threads = [threading.Thread(target=caption_all), threading.Thread(target=delete_doomed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = {item.sha256: item.embedding for item, item_id in zip(items, ids) if item_id not in deleted}
    strong = store_replica(tmp_path, milvus_server, name, consistency="Strong")
    for reader in (a, b, strong):
        assert all(reader.get(item_id) is None for item_id in deleted)
        listed = reader.list_items(None, None, None, 100, consistency="Strong").items
        assert sorted(i.sha256 for i in listed) == sorted(live)
        assert {i.id: i.caption for i in listed} == {i: captions[i] for i in ids if i not in deleted}
        query = unit_vectors(31, 1)[0]
        assert_ranking(reader.search(query, 40, consistency="Strong"), live, query, 40)


def test_one_id_given_to_two_contents_at_once_is_added_once(tmp_path, milvus_server):
    """Two streams of one replica give one explicit id to two contents at the same moment (each check made
    slow, so the two checks overlap unless something orders them): ADDED once, ALREADY_EXISTS once."""
    from search_service.store import AddOutcome, ConflictError

    collection = store_replica(tmp_path, milvus_server, f"one_id_{time.time_ns()}")
    query = collection.client.query

    def slow_query(*args, **kwargs):
        rows = query(*args, **kwargs)
        time.sleep(0.2)
        return rows

    collection.client.query = slow_query
    for round_ in range(4):
        contents = [new_items(40 + 2 * round_ + j, 1, id=f"shared-{round_}")[0] for j in range(2)]
        start, outcomes = threading.Barrier(2), {}

        def add(j):
            start.wait()
            outcomes[j] = collection.add([contents[j]])[0]

        threads = [threading.Thread(target=add, args=(j,)) for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kinds = sorted(type(o).__name__ for o in outcomes.values())
        assert kinds == ["AddOutcome", "ConflictError"], outcomes
        winner = next(contents[j] for j, o in outcomes.items() if isinstance(o, AddOutcome))
        assert all(o.added for o in outcomes.values() if isinstance(o, AddOutcome))
        assert all("shared" in str(o) for o in outcomes.values() if isinstance(o, ConflictError))
        assert collection.get(f"shared-{round_}").sha256 == winner.sha256
        assert [i.sha256 for i in collection.list_items({}, None, None, 10, consistency="Strong").items
                if i.id == f"shared-{round_}"] == [winner.sha256]


def test_many_recent_deletes_keep_reads_right_and_expressions_bounded(tmp_path, milvus_server):
    """300 deletes through one replica within its recent-delete window: its reads at the default (Session)
    level still equal brute force over the live items, and no read expression grows with the deletes."""
    from search_service.milvus import MAX_HIDDEN_DELETES

    collection = store_replica(tmp_path, milvus_server, f"deletes_{time.time_ns()}", index_type="FLAT")
    items = new_items(50, 400)
    ids = [o.id for o in collection.add(items)]
    gone = set(ids[:300])
    assert len(gone) > MAX_HIDDEN_DELETES
    for item_id in sorted(gone):
        assert collection.delete(item_id) is not None
    expressions = []
    for method in ("search", "query"):
        original = getattr(collection.client, method)

        def spy(*args, _original=original, **kwargs):
            expressions.append(kwargs.get("filter", ""))
            return _original(*args, **kwargs)

        setattr(collection.client, method, spy)
    live = {item.sha256: item.embedding for item, item_id in zip(items, ids) if item_id not in gone}
    for query in unit_vectors(51, 5):
        assert_ranking(collection.search(query, 20), live, query, 20)
        assert_ranking(collection.search(query, 20, filters={}), live, query, 20)
    assert sorted(i.sha256 for i in collection.list_items(None, None, None, 200).items) == sorted(live)
    assert all(collection.get(item_id) is None for item_id in list(gone)[:20])
    # (a read of captions names its page's keys: as long as the page, not the deletes)
    bounded = [e for e in expressions if not e.startswith("pk in [")]
    assert bounded and max(map(len, bounded)) < 2 * 1024, max(map(len, bounded))


def start_replicas_together(tmp_path, milvus_server, name: str, count: int, seed: int) -> list:
    """`count` replicas binding and opening one new collection at once (released together, then each after its
    own few milliseconds, as processes started together are); each one, or its error."""
    start, opened = threading.Barrier(count), [None] * count
    delays = np.random.default_rng(seed).uniform(0, 0.3, count)

    def open_one(j):
        start.wait()
        time.sleep(delays[j])
        try:
            opened[j] = store_replica(tmp_path / f"r{j}", milvus_server, name)
        except Exception as exc:  # reported by the caller with the others
            opened[j] = exc

    threads = [threading.Thread(target=open_one, args=(j,)) for j in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return opened


@pytest.mark.parametrize("rounds", [2, pytest.param(10, marks=pytest.mark.long)])  # ~5-10 s a round here
def test_replicas_started_together_on_a_new_collection_all_serve(tmp_path, milvus_server, rounds):
    """4 replicas start at the same instant on a new collection, `rounds` times: every one serves, each
    answering a search that equals brute force over what all of them added."""
    for round_ in range(rounds):
        name = f"together_{round_}_{time.time_ns()}"
        replicas = start_replicas_together(tmp_path / name, milvus_server, name, 4, seed=round_)
        assert not [r for r in replicas if isinstance(r, Exception)], [f"{type(r).__name__}: {r}" for r in replicas]
        live = {}
        for j, collection in enumerate(replicas):
            items = new_items(1000 * round_ + j, 3)
            assert all(o.added for o in collection.add(items))
            live.update((item.sha256, item.embedding) for item in items)
        query = unit_vectors(60 + round_, 1)[0]
        for collection in replicas:
            assert_ranking(collection.search(query, 12, consistency="Strong"), live, query, 12)


def test_a_replica_set_up_for_another_index_says_so_once(tmp_path, milvus_server, caplog):
    """A collection whose vector index is HNSW, a replica started for IVF_FLAT: not a loop of tracebacks but
    StoreSetupError (FAILED_PRECONDITION, health NOT_SERVING) saying what to do, logged once."""
    from search_service.milvus import MilvusCollection, MilvusSettings
    from search_service.store import StoreSetupError

    name = f"other_index_{time.time_ns()}"
    store_replica(tmp_path, milvus_server, name)
    other = MilvusCollection(tmp_path / "blobs", MilvusSettings(uri=milvus_server.uri, collection=name,
                                                               index_type="IVF_FLAT"))
    with caplog.at_level("ERROR", logger="search_service.milvus"):
        for _ in range(3):  # as health probes would
            with pytest.raises(StoreSetupError, match="HNSW.*--milvus-index HNSW"):
                other.open_index(DIM)
    assert len([r for r in caplog.records if "--milvus-index" in r.getMessage()]) == 1
    assert not other.is_open
