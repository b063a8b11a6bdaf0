"""Reindex of a live embedded store into another model (search_service/reindex.py, generations.py), against real
parts: the service in its own process, two real tritonservers (coca-tiny exported with random weights of seed 0
and of seed 1), real gRPC, SQLite and FAISS.

The oracles: coca's in-process models of the same weights (every live item's stored embedding after a switch
equals the new model's embedding of its bytes), what the clients were told (the live item set), exact search
over the stored embeddings (search answers, before and after a rollback), and that no search failed."""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from typing import Iterator

import grpc
import numpy as np
import pytest

from search_service.config import ServiceConfig
from search_service.pb import search_pb2 as pb
from search_service.testing import ServiceProcess, WireClient, p99_ms, search_latencies, wait_for, while_searching
from tests.test_backup import noise_jpegs

MODEL, PRETRAINED = "coca-tiny", "random"
QUERY = "a photo of noise"
SHARE = 0.5  # --reindex-share here: throttled chunks while clients search back to back, yet seconds per test


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tritons(plain_triton, tmp_path_factory):
    """(seed-0 server, seed-1 server): the store's model and the one it is reindexed into."""
    from serving.repository import EncoderSettings, ensure_repository
    from serving.testing import restartable_triton

    # the old export paths, as plain_triton's (the stored embeddings are compared with coca's torch ones at 1e-5)
    seed1 = ensure_repository(tmp_path_factory.mktemp("reindex-seed1") / "repo", MODEL, PRETRAINED, 1,
                              encoders=EncoderSettings("torch"), decoder_scheduler="sequence")
    with restartable_triton(seed1[0]) as new:
        yield plain_triton, new


@pytest.fixture(scope="module")
def seed1_coca():
    import coca

    return coca.load(MODEL, pretrained=PRETRAINED, seed=1)


def service_on(data, triton_url: str, share: float = SHARE) -> ServiceProcess:
    return ServiceProcess(data, triton_url, "--reindex-share", str(share))


def add(client: WireClient, images: list[bytes]) -> list[str]:
    results = list(client.add_images(pb.AddImageRequest(image=image) for image in images))
    assert all(r.outcome == pb.AddImageResult.ADDED for r in results), [r.error.message for r in results]
    return [r.id for r in results]


def reindex(client: WireClient, action=pb.ReindexRequest.START, triton: str = "", model: str = MODEL,
            pretrained: str = PRETRAINED) -> list[pb.ReindexProgress]:
    request = pb.ReindexRequest(action=action, to_model=model if action == pb.ReindexRequest.START else "",
                                to_pretrained=pretrained if action == pb.ReindexRequest.START else "", triton=triton)
    return list(client.stub.Reindex(request, timeout=120))


def stored(client: WireClient) -> dict[str, np.ndarray]:
    """Every live item's stored embedding, by id."""
    out, token = {}, ""
    while True:
        page = client.stub.List(pb.ListRequest(page_size=500, page_token=token, include_embeddings=True), timeout=60)
        out.update({item.id: np.asarray(item.embedding, np.float32) for item in page.items})
        if not page.next_page_token:
            return out
        token = page.next_page_token


def assert_embedded_by(model, client: WireClient, images_by_id: dict[str, bytes], live: set[str]) -> None:
    """The live set is the oracle's, and each stored embedding is `model`'s embedding of the item's bytes."""
    vectors = stored(client)
    assert set(vectors) == live
    ids = sorted(live)
    expected = embeddings_of(model, [images_by_id[i] for i in ids])
    np.testing.assert_allclose(np.stack([vectors[i] for i in ids]), expected, atol=1e-5)


_EMBEDDINGS: dict[tuple[int, bytes], np.ndarray] = {}


def embeddings_of(model, images: list[bytes]) -> np.ndarray:
    """`model`'s embeddings of `images`, each computed once (the checks repeat over the same items)."""
    missing = list(dict.fromkeys(image for image in images if (id(model), image) not in _EMBEDDINGS))
    if missing:
        _EMBEDDINGS.update({(id(model), image): vector for image, vector in zip(missing, model.embed_images(missing))})
    return np.stack([_EMBEDDINGS[id(model), image] for image in images])


def assert_search_is_exact(model, client: WireClient, k: int = 8) -> pb.SearchResponse:
    """SearchText's hits are the exact top k over the stored embeddings, by `model`'s query embedding."""
    vectors = stored(client)
    ids = sorted(vectors)
    scores = np.stack([vectors[i] for i in ids]) @ model.embed_texts([QUERY])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    response = client.search_text(QUERY, k=k)
    assert [h.id for h in response.hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in response.hits], scores[order], atol=1e-5)
    return response


class Traffic:
    """Clients adding, deleting and searching while a reindex runs; what they were told is the oracle."""

    def __init__(self, address: str, live: set[str], images_by_id: dict[str, bytes], new_images: list[bytes],
                 keep: set[str], writers: int = 1, searchers: int = 2):
        self.address, self.live, self.images_by_id = address, live, images_by_id
        self.new_images, self.deletable = list(new_images), sorted(live - keep)
        self.acknowledged: list[float] = []  # when each add and delete was acknowledged
        self.stop = threading.Event()
        self.search_errors: list[str] = []
        self.write_errors: list[str] = []
        self.answered_by: set[str] = set()
        self.searches = 0
        self.threads = ([threading.Thread(target=self._writer) for _ in range(writers)]
                        + [threading.Thread(target=self._searcher) for _ in range(searchers)])

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _writer(self) -> None:
        with WireClient(self.address, timeout=60) as client:
            while not self.stop.is_set() and (self.new_images or self.deletable):
                try:
                    self._write_once(client)
                except (AssertionError, grpc.RpcError, IndexError) as exc:  # (IndexError: another writer's pop)
                    if not isinstance(exc, IndexError):
                        self.write_errors.append(repr(exc))
                        return
                time.sleep(0.02)

    def _write_once(self, client: WireClient) -> None:
        if self.new_images:
            image = self.new_images.pop()
            (item_id,) = add(client, [image])
            self.images_by_id[item_id] = image
            self.live.add(item_id)
            self.acknowledged.append(time.monotonic())
        if self.deletable and len(self.new_images) % 2 == 0:
            victim = self.deletable.pop()
            client.delete(victim)
            self.live.discard(victim)
            self.acknowledged.append(time.monotonic())

    def _searcher(self) -> None:
        with WireClient(self.address, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.search_text(QUERY, k=5)
                    self.answered_by.add(response.answered_by)
                    self.searches += 1
                except grpc.RpcError as exc:
                    self.search_errors.append(f"{exc.code()}: {exc.details()}")


@contextlib.contextmanager
def slow_writes(slow_link, replica, live: set[str], images_by_id: dict[str, bytes], images: list[bytes],
                deletable: set[str]) -> Iterator[Traffic]:
    """Three clients adding `images` and deleting `deletable` through `replica` (a ServiceProcess), whose link to
    Milvus (`slow_link`) is slow meanwhile (30 ms a hop): its writes are under way when a switch flips the alias.
    They go on until 3 more are acknowledged after the block; none may fail."""
    slow_link.delay(0.03)
    with Traffic(replica.address, live, images_by_id, images, keep=set(live) - deletable, writers=3, searchers=0) as traffic:
        yield traffic
        ended = time.monotonic()
        wait_for(lambda: sum(t > ended for t in traffic.acknowledged) >= 3, 60, "writes through the other replica")
    slow_link.delay(0)
    # with the replica's log, where an INTERNAL answer's traceback is (make test on 26ece4f, load ~4: one add
    # answered INTERNAL "collection not found"; not seen in 3 runs alone)
    assert not traffic.write_errors, f"{traffic.write_errors}\n--- the replica's log ---\n{replica.output(80)}"


def drain(stream) -> None:
    with contextlib.suppress(grpc.RpcError):
        list(stream)


def kill_mid_reindex(client: WireClient, service, relay, more: list[bytes], ids: list[str], images_by_id: dict,
                     live: set) -> int:
    """START a reindex into the Triton behind `relay`; once some batches are committed, stall that Triton, add
    `more` and delete 5 of `ids` through the old model (the oracle follows), then kill -9 the service. Returns how many were embedded before the stall."""
    request = pb.ReindexRequest(action=pb.ReindexRequest.START, to_model=MODEL, to_pretrained=PRETRAINED,
                                triton=relay.url)
    stream = client.stub.Reindex(request, timeout=120)
    listener = threading.Thread(target=drain, args=(stream,), daemon=True)  # cancelled below
    listener.start()
    done_before_kill, total = wait_for(lambda: embedded_so_far(client), 60, "the reindex to commit some batches",
                                       interval=0.01)
    relay.stall()  # the new model's Triton stops answering mid-way; then kill -9
    assert 0 < done_before_kill < total
    for item_id, image in zip(add(client, more), more):  # the old model still serves
        images_by_id[item_id] = image
        live.add(item_id)
    for victim in sorted(ids)[:5]:
        client.delete(victim)
        live.discard(victim)
    service.kill()
    stream.cancel()
    listener.join(30)
    return done_before_kill


def embedded_so_far(client: WireClient, at_least: int = 32):
    """(done, total) of the running reindex once it has embedded `at_least` items (Stats.reindex), else None."""
    found = re.search(r"(\d+)/(\d+) items", client.stats().reindex)
    return (int(found[1]), int(found[2])) if found and int(found[1]) >= at_least else None


# ---------------------------------------------------------------- tests
def test_reindex_while_clients_write_and_search_then_rollback(tritons, tiny_coca, seed1_coca, tmp_path):
    old, new = tritons
    images = noise_jpegs(130, seed=22)
    with service_on(tmp_path / "data", old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
        first = add(client, images[:100])
        images_by_id, live = dict(zip(first, images[:100])), set(first)
        before = assert_search_is_exact(tiny_coca, client)
        assert before.answered_by.startswith("generation 0: coca-tiny")
        captioned = client.search_text(QUERY, k=1, with_captions=True).hits[0]  # by the old decoder, kept
        assert captioned.caption

        with Traffic(service.address, live, images_by_id, images[100:], keep={captioned.id}) as traffic:
            started = time.monotonic()
            steps = reindex(client, triton=new.grpc_url)
            ended = time.monotonic()
            wait_for(lambda: not traffic.new_images, 60, "the clients' writes")
        assert steps[-1].phase == "done" and steps[-1].generation == 1
        assert any(s.phase == "embedding" and s.done < s.total for s in steps)
        assert sum(started < t < ended for t in traffic.acknowledged) >= 3  # writes did land during the reindex
        assert not traffic.search_errors, traffic.search_errors[:3]
        assert traffic.searches > 0
        assert all(a.startswith(("generation 0:", "generation 1:")) for a in traffic.answered_by)

        assert_embedded_by(seed1_coca, client, images_by_id, live)
        after = assert_search_is_exact(seed1_coca, client)
        stats = client.stats()
        assert stats.generation == 1 and after.answered_by == stats.answered_by == steps[-1].answered_by
        assert stats.answered_by.startswith("generation 1: coca-tiny") and stats.old_generation.startswith("generation 0")
        assert stats.count == stats.indexed == len(live)
        assert [s.address for s in stats.triton_endpoints] == [new.grpc_url]
        assert stats.captions_by_old_models == 1 and client.get(captioned.id).caption == captioned.caption

        # items added after the switch are embedded by the new model, and by the old one on rollback
        extra = noise_jpegs(3, seed=23)
        for item_id, image in zip(add(client, extra), extra):
            images_by_id[item_id] = image
            live.add(item_id)
        assert_embedded_by(seed1_coca, client, images_by_id, live)

        rollback = subprocess.run([sys.executable, "-m", "clients.cli", "reindex", "--server", service.address,
                                   "--rollback"], capture_output=True, text=True, timeout=120)
        assert rollback.returncode == 0, rollback.stderr
        assert "generation 0" in rollback.stdout
        assert_embedded_by(tiny_coca, client, images_by_id, live)
        assert assert_search_is_exact(tiny_coca, client).answered_by.startswith("generation 0: coca-tiny")
        assert client.stats().old_generation.startswith("generation 1")
        assert client.stats().captions_by_old_models == 0  # generation 0 answers again: its decoder made it

        reindex(client, pb.ReindexRequest.DROP_OLD)
        assert client.stats().old_generation == ""
        with pytest.raises(grpc.RpcError) as refused:
            reindex(client, pb.ReindexRequest.ROLLBACK)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no old generation" in refused.value.details()


def test_searches_keep_their_latency_while_a_reindex_runs(tritons, seed1_coca, tmp_path):
    """The throttle at its default (reindex.py Throttle, --reindex-share 0.01): a client searching back to back
    during a reindex sees a p99 within 2x the p99 it saw idle just before, in the same run (unthrottled,
    --reindex-share 1: 5-13x on 2 loaded cores, the new model's Triton taking the CPU), and the reindex still
    completes under that load, exact."""
    old, new = tritons
    images = noise_jpegs(4, seed=26)  # 2 throttled chunks: ~1-4 s apart, as each chunk takes its Triton 10-20 ms
    with service_on(tmp_path / "data", old.grpc_url, share=ServiceConfig.reindex_share) as service, \
            WireClient(service.address, timeout=60) as client:
        images_by_id = dict(zip(add(client, images), images))
        idle = search_latencies(client, threading.Event(), 400)
        (steps, _), during = while_searching(client, lambda: reindex(client, triton=new.grpc_url))
        assert p99_ms(during) <= 2 * p99_ms(idle), (p99_ms(during), p99_ms(idle), len(during))
        assert len(during) >= 10
        assert steps[-1].phase == "done" and steps[-1].generation == 1
        assert_embedded_by(seed1_coca, client, images_by_id, set(images_by_id))


def test_reindex_refuses_what_it_cannot_switch_to(tritons, tmp_path):
    old, new = tritons
    with service_on(tmp_path / "data", old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
        add(client, noise_jpegs(3, seed=24))
        cases = [
            (dict(triton=new.grpc_url, model="coca-huge"), grpc.StatusCode.FAILED_PRECONDITION, "not coca-huge (random)"),
            (dict(triton=old.grpc_url), grpc.StatusCode.FAILED_PRECONDITION, "answers from"),
            (dict(triton="127.0.0.1:1"), grpc.StatusCode.UNAVAILABLE, "127.0.0.1:1"),
            (dict(triton="not an address"), grpc.StatusCode.INVALID_ARGUMENT, "HOST:PORT"),
            (dict(triton=""), grpc.StatusCode.INVALID_ARGUMENT, "give triton"),
        ]
        for arguments, code, words in cases:
            with pytest.raises(grpc.RpcError) as refused:
                reindex(client, **arguments)
            assert refused.value.code() == code and words in refused.value.details(), (arguments, refused.value)
        with pytest.raises(grpc.RpcError) as refused:
            reindex(client, pb.ReindexRequest.RESUME)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        cli = subprocess.run([sys.executable, "-m", "clients.cli", "reindex", "--server", service.address, "--to-model",
                              "coca-huge", "--to-pretrained", PRETRAINED, "--triton", new.grpc_url],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "coca-huge" in cli.stderr, cli.stderr
        assert client.stats().generation == 0 and len(client.search_text(QUERY, k=3).hits) == 3  # still serving


@pytest.mark.long  # ~30 s under load (three service starts): make test-reliability
def test_reindex_killed_mid_way_resumes_with_the_same_oracle(tritons, seed1_coca, tmp_path):
    from serving.testing import TcpRelay

    old, new = tritons
    images = noise_jpegs(210, seed=25)
    data = tmp_path / "data"
    with TcpRelay(new.grpc_url) as relay:
        with service_on(data, old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
            ids = add(client, images[:200])
            images_by_id, live = dict(zip(ids, images[:200])), set(ids)
            done_before_kill = kill_mid_reindex(client, service, relay, images[200:], ids, images_by_id, live)
        relay.resume()
        with service_on(data, old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
            assert client.stats().reindex.startswith("generation 1")  # recorded, stopped
            steps = reindex(client, pb.ReindexRequest.RESUME)
            # what was committed before the kill is not embedded again (less the 5 deleted since, at most)
            assert steps[0].done >= done_before_kill - 5
            assert steps[-1].phase == "done" and client.stats().generation == 1
            assert_embedded_by(seed1_coca, client, images_by_id, live)
            assert_search_is_exact(seed1_coca, client)
        # a restart after the switch answers from the new generation, and refuses a Triton of the old weights
        with service_on(data, relay.url) as service, WireClient(service.address, timeout=60) as client:
            assert_embedded_by(seed1_coca, client, images_by_id, live)
            assert client.search_text(QUERY, k=3).answered_by.startswith("generation 1")
        with service_on(data, old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.search_text(QUERY, k=3)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "generation 1" in refused.value.details()


def made_before_aliases(uri: str, name: str, dim: int, blobs) -> None:
    """A plain Milvus collection called `name`, as coca-search made them before aliases (generation 0)."""
    from search_service.milvus import SCHEMA_VERSION, MilvusCollection, MilvusSettings

    collection = MilvusCollection(blobs, MilvusSettings(uri=uri, collection=name, index_type="FLAT"))
    collection._create_collection(name, collection._item_schema(
        {"coca_schema": SCHEMA_VERSION, "model": MODEL, "pretrained": PRETRAINED, "embedding_dim": dim}))
    collection.close()


RENAME_GAP_S = 0.5  # the rename gap made here: a real switch's lasts a few ms


def test_reads_through_the_plain_name_wait_out_the_rename_gap(milvus_server, tmp_path):
    """A first switch renames the plain collection NAME and makes NAME an alias a moment later. A replica still
    reading NAME that asks in between (the find by content before an add, a search, a get, a list, a count) gets
    the answer once the alias is there, not "collection not found" (an add answered INTERNAL in ~1 of 25 runs of
    the write-gap test below). Oracle: the items stored, and exact search over their embeddings."""
    from pymilvus import MilvusClient

    from search_service.milvus import MilvusCollection, MilvusSettings
    from search_service.store import NewItem, default_id, sha256_hex

    name, dim = f"gap_{time.time_ns()}", 8
    made_before_aliases(milvus_server.uri, name, dim, tmp_path / "made")
    collection = MilvusCollection(tmp_path / "blobs", MilvusSettings(uri=milvus_server.uri, collection=name,
                                                                     index_type="FLAT"))
    milvus = MilvusClient(uri=milvus_server.uri)
    try:
        collection.bind_model(MODEL, PRETRAINED, dim)
        collection.open_index(dim)
        vectors = np.random.default_rng(5).standard_normal((6, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        data = [f"gap {n}".encode() for n in range(len(vectors))]
        items = [NewItem(sha256_hex(d), f"mem:{n}", v, data=d) for n, (d, v) in enumerate(zip(data, vectors))]
        collection.add(items)
        ids = [default_id(item.sha256) for item in items]
        ranked = [ids[n] for n in np.argsort(-(vectors @ vectors[2]), kind="stable")]
        assert collection.reading == name  # a plain collection: this replica reads NAME itself

        reads = {"find by content": (lambda: collection.find_sha(items[0].sha256).id, ids[0]),
                 "get": (lambda: collection.get(ids[3]).uri, "mem:3"),
                 "search": (lambda: [h.item.id for h in collection.search(vectors[2], k=6)], ranked),
                 "list": (lambda: sorted(i.id for i in collection.list_items(None, None, None, 10).items), sorted(ids)),
                 "count": (lambda: collection._count(), len(ids))}
        for what, (read, expected) in reads.items():
            if milvus.has_collection(f"{name}_g0"):  # back to a plain NAME for the next read
                milvus.drop_alias(name)
                milvus.rename_collection(f"{name}_g0", name)
            milvus.rename_collection(name, f"{name}_g0")
            aliased = threading.Timer(RENAME_GAP_S, lambda: milvus.create_alias(f"{name}_g0", name))
            aliased.start()
            started = time.monotonic()
            try:
                answer = read()
            finally:
                aliased.join()
            assert answer == expected, what
            assert time.monotonic() - started >= RENAME_GAP_S * 0.9, what  # asked in the gap, answered after it
    finally:
        with contextlib.suppress(Exception):
            milvus.drop_alias(name)
        for physical in (name, f"{name}_g0"):
            with contextlib.suppress(Exception):
                milvus.drop_collection(physical)
        collection.close()
        milvus.close()


def test_milvus_reindex_behind_the_alias_while_clients_write_and_search_then_rollback(
        tritons, tiny_coca, seed1_coca, milvus_server, tmp_path):
    """Clients write through both replicas during the switch; the other replica reaches Milvus over a slow link
    (30 ms a hop), so its adds and deletes are under way when the alias flips: each is made in the new generation."""
    from pymilvus import MilvusClient

    from serving.testing import TcpRelay

    old, new = tritons
    name = f"reindex_{time.time_ns()}"
    made_before_aliases(milvus_server.uri, name, tiny_coca.embed_texts([QUERY]).shape[-1], tmp_path / "made")
    images = noise_jpegs(200, seed=26)
    milvus = MilvusClient(uri=milvus_server.uri)
    replica = [tmp_path / "data", old.grpc_url, "--vector-store", "milvus", "--collection", name,
               "--milvus-index", "FLAT", "--reindex-share", str(SHARE)]
    with TcpRelay(f"127.0.0.1:{milvus_server.port}") as slow_link, \
            ServiceProcess(*replica, "--milvus-uri", milvus_server.uri) as service, \
            ServiceProcess(*replica, "--milvus-uri", f"http://{slow_link.url}") as other, \
            WireClient(service.address, timeout=60) as client, WireClient(other.address, timeout=60) as follower:
        first = add(client, images[:70])
        images_by_id, live = dict(zip(first, images[:70])), set(first)
        assert assert_search_is_exact(tiny_coca, client).answered_by.startswith("generation 0: coca-tiny")
        assert_search_is_exact(tiny_coca, follower)  # serving (bound to generation 0) before the reindex
        captioned = client.search_text(QUERY, k=1, with_captions=True).hits[0]  # by the old decoder, kept
        assert captioned.caption and client.stats().captions_by_old_models == 0

        with slow_writes(slow_link, other, live, images_by_id, images[90:150],
                         set(first[35:]) - {captioned.id}) as elsewhere:
            with Traffic(service.address, live, images_by_id, images[70:90],
                         keep=set(first[35:]) | {captioned.id}) as traffic:
                started = time.monotonic()
                steps = reindex(client, triton=new.grpc_url)
                ended = time.monotonic()
                wait_for(lambda: not traffic.new_images, 60, "the clients' writes")
        assert steps[-1].phase == "done" and steps[-1].generation == 1
        assert sum(started < t < ended for t in traffic.acknowledged) >= 3  # writes did land during the reindex
        assert sum(started < t < ended for t in elsewhere.acknowledged) >= 3  # through the other replica too
        assert not traffic.search_errors, traffic.search_errors[:3]
        assert not traffic.write_errors, traffic.write_errors
        assert all(a.startswith(("generation 0:", "generation 1:")) for a in traffic.answered_by)
        # the plain collection became generation 0 (renamed), the name an alias of generation 1
        assert milvus.describe_alias(name)["collection_name"] == f"{name}_g1"
        assert milvus.describe_alias(f"{name}_rollback")["collection_name"] == f"{name}_g0"

        assert_embedded_by(seed1_coca, client, images_by_id, live)
        after = assert_search_is_exact(seed1_coca, client)
        stats = client.stats()
        assert stats.generation == 1 and after.answered_by == stats.answered_by == steps[-1].answered_by
        assert stats.answered_by.startswith("generation 1: coca-tiny") and stats.old_generation.startswith("generation 0")
        assert stats.count == len(live)  # counted at Strong: no deleted row came back (reads hide recent deletes)
        assert [s.address for s in stats.triton_endpoints] == [new.grpc_url]
        assert stats.captions_by_old_models == 1 and client.get(captioned.id).caption == captioned.caption
        # the other replica follows the alias with the new generation's recorded Triton (within FOLLOW_S)
        wait_for(lambda: follower.search_text(QUERY, k=3).answered_by == stats.answered_by, 15, "the other replica")
        assert_search_is_exact(seed1_coca, follower)

        extra = noise_jpegs(3, seed=27)  # added after the switch: embedded by the new model, by the old on rollback
        for item_id, image in zip(add(client, extra), extra):
            images_by_id[item_id] = image
            live.add(item_id)
        victim = min(live & set(first) - {captioned.id})  # (one the clients did not delete already)
        client.delete(victim)
        live.discard(victim)
        assert_embedded_by(seed1_coca, client, images_by_id, live)

        with slow_writes(slow_link, other, live, images_by_id, images[150:],
                         set(sorted(live - {captioned.id})[:20])) as elsewhere:
            started = time.monotonic()
            steps = reindex(client, pb.ReindexRequest.ROLLBACK)  # (an alias-backed switch: generation 1 -> 0)
            ended = time.monotonic()
        acknowledged = elsewhere.acknowledged  # (writes under way at the flip: one acknowledged in it, or after)
        assert any(started < t < ended for t in acknowledged) or min(acknowledged) > ended
        assert steps[-1].generation == 0 and steps[-1].answered_by.startswith("generation 0: coca-tiny")
        assert_embedded_by(tiny_coca, client, images_by_id, live)
        assert_search_is_exact(tiny_coca, client)
        stats = client.stats()
        assert stats.old_generation.startswith("generation 1")
        assert stats.captions_by_old_models == 0  # generation 0 answers again: its decoder made it
        wait_for(lambda: follower.search_text(QUERY, k=3).answered_by.startswith("generation 0"), 15, "the other replica")
        assert_search_is_exact(tiny_coca, follower)

        reindex(client, pb.ReindexRequest.DROP_OLD)
        assert client.stats().old_generation == ""
        assert f"{name}_g1" not in milvus.list_collections()
        with pytest.raises(grpc.RpcError) as refused:
            reindex(client, pb.ReindexRequest.ROLLBACK)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.long  # three service starts on Milvus (~1 min here): make test-reliability
def test_milvus_reindex_killed_mid_way_resumes_with_the_same_oracle(tritons, seed1_coca, milvus_server, tmp_path):
    from serving.testing import TcpRelay

    old, new = tritons
    name = f"resume_{time.time_ns()}"  # a new collection: alias-backed from creation (NAME -> NAME_g0)
    images = noise_jpegs(110, seed=28)

    def replica(triton: str) -> ServiceProcess:
        return ServiceProcess(tmp_path / "data", triton, "--vector-store", "milvus", "--milvus-uri", milvus_server.uri,
                              "--collection", name, "--milvus-index", "FLAT")

    with TcpRelay(new.grpc_url) as relay:
        with replica(old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
            ids = add(client, images[:100])
            images_by_id, live = dict(zip(ids, images[:100])), set(ids)
            done_before_kill = kill_mid_reindex(client, service, relay, images[100:], ids, images_by_id, live)
        relay.resume()
        with replica(old.grpc_url) as service, WireClient(service.address, timeout=60) as client:
            assert client.stats().reindex.startswith("generation 1")  # the collection being built, stopped
            steps = reindex(client, pb.ReindexRequest.RESUME)
            assert steps[0].done >= done_before_kill  # what was copied before the kill is not embedded again
            assert steps[-1].phase == "done" and client.stats().generation == 1
            assert_embedded_by(seed1_coca, client, images_by_id, live)
            assert_search_is_exact(seed1_coca, client)
            assert client.stats().count == len(live)  # at Strong: no deleted row came back
        with replica(relay.url) as service, WireClient(service.address, timeout=60) as client:
            assert_embedded_by(seed1_coca, client, images_by_id, live)  # a restart answers from generation 1
            assert client.search_text(QUERY, k=3).answered_by.startswith("generation 1")
