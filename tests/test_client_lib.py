"""clients.coca_client against a scripted in-process gRPC server (no Triton, a few seconds): retries on
UNAVAILABLE only, with backoff, inside one deadline; stream resumption; typed errors with the server's
message; token and TLS. The real service is exercised in tests/test_clients.py."""
from __future__ import annotations

import asyncio
import random
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from clients.coca_client import (AddItem, AsyncClient, Client, DeadlineExceeded, InvalidArgument, NotFound, Outcome,
                                 ResourceExhausted, RetryPolicy, SearchError, Unauthenticated, Unavailable)
from search_service.pb import search_pb2 as pb
from search_service.pb import search_pb2_grpc

FAST = RetryPolicy(attempts=4, initial_backoff=0.02, max_backoff=0.1)


class Scripted(search_pb2_grpc.SearchServiceServicer):
    """Fails the first `unavailable` calls of each method with UNAVAILABLE, then answers."""

    def __init__(self):
        self.unavailable = 0
        self.shed = 0  # the first `shed` calls of each method (after `unavailable`): RESOURCE_EXHAUSTED + hint
        self.retry_after_ms = "200"
        self.calls: dict[str, int] = {}
        self.called_at: list[float] = []
        self.seen_metadata: list[dict] = []
        self.break_stream_after = None  # AddImages: UNAVAILABLE after this many results, once
        self.streams: list[list[bytes]] = []
        self.reindexed: list[pb.ReindexRequest] = []
        self.lock = threading.Lock()

    def _enter(self, name, context):
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.called_at.append(time.monotonic())
            self.seen_metadata.append(dict(context.invocation_metadata()))
            if self.calls[name] <= self.unavailable:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"Triton at 127.0.0.1:1 is not answering ({name})")
            if self.calls[name] <= self.unavailable + self.shed:  # as search_service/admission.py sheds
                if self.retry_after_ms is not None:
                    context.set_trailing_metadata((("retry-after-ms", self.retry_after_ms),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded: 8 caption requests in flight")

    def Stats(self, request, context):
        self._enter("Stats", context)
        return pb.StatsResponse(count=3, indexed=3, index_type="Flat", index_active="Flat", model="coca-tiny",
                                pretrained="random", embedding_dim=64, triton_ready=True)

    def SearchText(self, request, context):
        self._enter("SearchText", context)
        if not request.text.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
        if request.text == "slow":
            time.sleep(1.0)
        hits = [pb.Hit(id=f"id{i}", score=1.0 - i / 10, uri=f"file:///p{i}.jpg", caption="a caption",
                       metadata={"i": str(i)}) for i in range(request.options.k or 10)]
        return pb.SearchResponse(hits=hits, searched=42)

    def CaptionStream(self, request, context):
        self._enter("CaptionStream", context)
        yield pb.CaptionChunk(piece="a", text="a", token_count=1)
        yield pb.CaptionChunk(piece=" cat", text="a cat", token_count=2, done=True,
                              caption=pb.CaptionResponse(text="a cat", tokens=[1, 2]))

    def Backup(self, request, context):
        self._enter("Backup", context)
        if not request.out:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give the backup folder (out)")
        yield pb.BackupProgress(phase="blobs", done=1, total=2)
        yield pb.BackupProgress(phase="done", done=2, total=2, summary=pb.BackupSummary(
            out=request.out, items=5, blobs=2, blobs_copied=2, bytes_copied=900, sequence=7, seconds=0.5))

    def Reindex(self, request, context):
        self._enter("Reindex", context)
        self.reindexed.append(request)
        if request.action == pb.ReindexRequest.ROLLBACK:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no old generation is kept to roll back to")
        yield pb.ReindexProgress(phase="embedding", done=3, total=4, rate=2.0, eta_seconds=0.5, generation=1)
        yield pb.ReindexProgress(phase="done", done=4, total=4, generation=1, answered_by="generation 1")

    def Get(self, request, context):
        self._enter("Get", context)
        context.abort(grpc.StatusCode.NOT_FOUND, f"no item with id {request.id!r}")

    def Delete(self, request, context):
        self._enter("Delete", context)
        if self.calls["Delete"] > 1:  # the first attempt "went through" but its answer was lost
            context.abort(grpc.StatusCode.NOT_FOUND, f"no item with id {request.id!r}")
        context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    def AddImages(self, request_iterator, context):
        self._enter("AddImages", context)
        received = []
        self.streams.append(received)
        for index, request in enumerate(request_iterator):
            received.append(request.image)
            if self.break_stream_after is not None and index == self.break_stream_after:
                self.break_stream_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "service restarting")
            if request.image == b"bad":
                yield pb.AddImageResult(index=index, outcome=pb.AddImageResult.FAILED,
                                        error=pb.Error(code=3, message="<bytes, 3 B>: not an image"))
            else:
                yield pb.AddImageResult(index=index, outcome=pb.AddImageResult.ADDED, id=request.image.decode())


@pytest.fixture
def scripted():
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_typed_results_and_token(scripted):
    with Client(scripted.target, token="s3cret", retry=FAST) as client:
        result = client.search_text("a cat", k=3)
        assert result.searched == 42 and len(result) == 3 and [h.id for h in result] == ["id0", "id1", "id2"]
        assert result[1].score == pytest.approx(0.9) and result[1].metadata == {"i": "1"}
        assert result[0].caption == "a caption" and result[0].uri == "file:///p0.jpg"
        stats = client.stats()
        assert (stats.count, stats.model, stats.embedding_dim, stats.triton_ready) == (3, "coca-tiny", 64, True)
    assert all(m.get("authorization") == "Bearer s3cret" for m in scripted.seen_metadata)


def test_token_from_environment(scripted, monkeypatch):
    monkeypatch.setenv("COCA_SEARCH_TOKEN", "from-env")
    with Client(scripted.target) as client:
        client.stats()
    assert scripted.seen_metadata[-1]["authorization"] == "Bearer from-env"


def test_unavailable_is_retried_with_backoff(scripted):
    scripted.unavailable = 2
    with Client(scripted.target, retry=FAST) as client:
        assert client.stats().count == 3
    assert scripted.calls["Stats"] == 3


def test_unavailable_gives_up_after_the_policy(scripted):
    scripted.unavailable = 10
    with Client(scripted.target, retry=FAST) as client, pytest.raises(Unavailable) as info:
        client.stats()
    assert scripted.calls["Stats"] == FAST.attempts
    error = info.value
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == FAST.attempts
    assert "Triton at 127.0.0.1:1 is not answering" in error.details
    assert str(error).startswith(f"Stats on {scripted.target}: UNAVAILABLE: Triton")
    assert "after 4 attempts" in str(error) and "try again shortly" in str(error)


def test_other_codes_are_not_retried(scripted):
    with Client(scripted.target, retry=FAST) as client:
        with pytest.raises(InvalidArgument) as info:
            client.search_text("  ")
        assert scripted.calls["SearchText"] == 1
        assert info.value.details == "text is empty" and isinstance(info.value, SearchError)
        with pytest.raises(NotFound, match="no item with id 'nope'"):
            client.get("nope")
        assert scripted.calls["Get"] == 1


def test_one_deadline_covers_the_retries(scripted):
    scripted.unavailable = 100
    slow_policy = RetryPolicy(attempts=100, initial_backoff=0.1, max_backoff=0.1, jitter=0)
    with Client(scripted.target, retry=slow_policy) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.stats(timeout=0.5)
        assert time.monotonic() - started < 1.0 and 3 <= scripted.calls["Stats"] <= 6
        scripted.unavailable = 0
        with pytest.raises(DeadlineExceeded) as info:
            client.search_text("slow", timeout=0.2)
        assert "longer deadline" in str(info.value)


def test_a_shed_call_is_retried_after_the_servers_hint(scripted):
    """RESOURCE_EXHAUSTED with retry-after-ms: asked again no sooner than the hint, and answered.
    (Old client: ResourceExhausted on the first refusal.)"""
    scripted.shed = 2
    with Client(scripted.target, retry=FAST) as client:
        assert client.stats().count == 3
    assert scripted.calls["Stats"] == 3
    gaps = [b - a for a, b in zip(scripted.called_at, scripted.called_at[1:])]
    assert all(0.2 <= gap < 0.2 * (1 + FAST.jitter) + 0.2 for gap in gaps), gaps  # the hint, jittered upwards


def test_a_shed_stream_is_retried_and_an_async_call_too(scripted):
    scripted.shed = 1
    with Client(scripted.target, retry=FAST) as client:
        assert [r.id for r in client.add([b"a", b"b"])] == ["a", "b"]
    assert scripted.calls["AddImages"] == 2 and scripted.streams[-1] == [b"a", b"b"]

    async def run():
        async with AsyncClient(scripted.target, retry=FAST) as client:
            return await client.search_text("a cat", k=2)

    assert [h.id for h in asyncio.run(run())] == ["id0", "id1"] and scripted.calls["SearchText"] == 2


def test_a_shed_caption_stream_is_retried_before_its_first_chunk(scripted):
    scripted.shed = 1
    with Client(scripted.target, retry=FAST) as client:
        assert [c.piece for c in client.caption_stream(b"img")] == ["a", " cat"]
    assert scripted.calls["CaptionStream"] == 2  # shed, then answered
    scripted.calls.clear()

    async def run():
        async with AsyncClient(scripted.target, retry=FAST) as client:
            return [c.text async for c in client.caption_stream(b"img")]

    assert asyncio.run(run()) == ["a", "a cat"] and scripted.calls["CaptionStream"] == 2


def test_shed_retries_give_up_within_the_deadline(scripted):
    scripted.shed, scripted.retry_after_ms = 100, "300"
    with Client(scripted.target, retry=RetryPolicy(attempts=100)) as client:
        started = time.monotonic()
        with pytest.raises(ResourceExhausted) as info:
            client.stats(timeout=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 and 2 <= scripted.calls["Stats"] <= 4, (elapsed, scripted.calls)
    assert info.value.retry_after == pytest.approx(0.3) and info.value.attempts == scripted.calls["Stats"]


def node_answers(target: str, calls: list[dict]) -> list:
    """The Node client's answers (tests/node/answers.js), each error as {error, code, attempts, retryAfterMs}."""
    import json
    import shutil
    from pathlib import Path

    if shutil.which("node") is None:
        pytest.skip("node is not installed (the Node.js client needs Node >= 18)")
    script = Path(__file__).resolve().parent / "node" / "answers.js"
    done = subprocess.run(["node", str(script), target, json.dumps(calls)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_node_client_retries_a_shed_call_within_its_deadline(scripted):
    """As the Python client: asked again after the hint and answered; given up inside a 1 s deadline; no
    retry without a hint. (Old Node client: RESOURCE_EXHAUSTED on the first refusal.)"""
    scripted.shed = 2
    [stats] = node_answers(scripted.target, [{"call": "stats"}])
    assert stats["count"] == 3 and scripted.calls["Stats"] == 3
    gaps = [b - a for a, b in zip(scripted.called_at, scripted.called_at[1:])]
    assert all(gap >= 0.2 for gap in gaps), gaps
    scripted.calls.clear()
    scripted.shed, scripted.retry_after_ms = 100, "300"
    started = time.monotonic()
    [refused] = node_answers(scripted.target, [{"call": "stats", "args": [{"timeout": 1000}]}])
    assert time.monotonic() - started < 10  # (node's own start-up included)
    assert refused["code"] == "RESOURCE_EXHAUSTED" and refused["retryAfterMs"] == 300, refused
    assert 2 <= scripted.calls["Stats"] == refused["attempts"] <= 4, (refused, scripted.calls)
    scripted.calls.clear()
    scripted.retry_after_ms = None
    [final] = node_answers(scripted.target, [{"call": "stats"}])
    assert final["code"] == "RESOURCE_EXHAUSTED" and final["retryAfterMs"] is None and scripted.calls["Stats"] == 1


def test_resource_exhausted_without_a_hint_is_final(scripted):
    """A refusal that asking again cannot change (a message over the size limit) has no hint: not retried."""
    scripted.shed, scripted.retry_after_ms = 100, None
    with Client(scripted.target, retry=FAST) as client, pytest.raises(ResourceExhausted) as info:
        client.stats()
    assert scripted.calls["Stats"] == 1 and info.value.retry_after is None


def test_delete_retried_after_a_lost_answer_counts_as_done(scripted):
    with Client(scripted.target, retry=FAST) as client:
        assert client.delete("x") == "x"
    assert scripted.calls["Delete"] == 2


def test_connection_refused_has_a_hint():
    with Client("127.0.0.1:1", retry=RetryPolicy(attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(Unavailable) as info:
            client.stats(timeout=5)
    assert "Is the search service running there?" in str(info.value) and info.value.attempts == 2


def test_add_resumes_after_unavailable_mid_stream(scripted):
    scripted.break_stream_after = 2  # the third item is received, then the stream breaks
    items = [AddItem(image=f"img{i}".encode()) for i in range(5)] + [b"bad"]
    with Client(scripted.target, retry=FAST) as client:
        results = list(client.add(items))
    assert [r.index for r in results] == list(range(6))
    assert [r.id for r in results[:5]] == [f"img{i}" for i in range(5)]
    assert results[5].outcome is Outcome.FAILED and not results[5].ok
    assert results[5].error.code == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in results[5].error.message
    assert scripted.calls["AddImages"] == 2
    assert scripted.streams[1][0] == b"img2"  # resumed at the first unacknowledged item


def test_add_from_a_generator_is_not_replayed(scripted):
    scripted.break_stream_after = 1
    with Client(scripted.target, retry=FAST) as client, pytest.raises(Unavailable):
        list(client.add(f"img{i}".encode() for i in range(4)))
    assert scripted.calls["AddImages"] == 1


def test_add_files_reports_unreadable_files_alone(scripted, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"A")
    with Client(scripted.target, retry=FAST) as client:
        results = list(client.add_files([tmp_path / "a.jpg", tmp_path / "missing.jpg"]))
    assert results[0].id == "A"
    # The scripted server "adds" the empty bytes it got; the real one fails them (tests/test_clients.py).
    assert scripted.streams[0] == [b"A", b""]


def test_async_client(scripted):
    scripted.unavailable = 1

    async def main():
        async with AsyncClient(scripted.target, retry=FAST, token="t") as client:
            results = await asyncio.gather(*(client.search_text(q, k=2) for q in ("a", "b", "c")))
            assert all([h.id for h in r] == ["id0", "id1"] for r in results)
            with pytest.raises(InvalidArgument):
                await client.search_text("")
            with pytest.raises(NotFound):
                await client.get("nope")
            scripted.break_stream_after = 0
            added = [r async for r in client.add([b"x", b"y", b"bad"])]
            assert [r.outcome for r in added] == [Outcome.ADDED, Outcome.ADDED, Outcome.FAILED]
            assert (await client.stats()).count == 3

    asyncio.run(main())
    assert scripted.calls["SearchText"] == 4 + 1  # one UNAVAILABLE retried, then the bad one


def test_the_async_client_backs_up_and_reindexes_as_the_sync_one(scripted):
    from clients.coca_client import FailedPrecondition

    with Client(scripted.target, retry=FAST) as client:
        backup = list(client.backup("bk"))
        reindex = list(client.reindex("start", to_model="m", to_pretrained="p", triton="t:1"))

    async def main():
        async with AsyncClient(scripted.target, retry=FAST) as client:
            got = ([p async for p in client.backup("bk")],
                   [p async for p in client.reindex("start", to_model="m", to_pretrained="p", triton="t:1")])
            with pytest.raises(InvalidArgument, match="backup folder"):
                [p async for p in client.backup("")]
            with pytest.raises(FailedPrecondition, match="roll back"):
                [p async for p in client.reindex("rollback")]
            with pytest.raises(ValueError, match="one of start"):
                [p async for p in client.reindex("undo")]
            return got

    assert asyncio.run(main()) == (backup, reindex)
    assert backup[-1].summary.out == "bk" and backup[-1].summary.items == 5 and backup[0].summary is None
    assert [p.phase for p in reindex] == ["embedding", "done"] and reindex[-1].answered_by == "generation 1"
    sent = [(r.action, r.to_model, r.to_pretrained, r.triton) for r in scripted.reindexed]
    assert sent == [(pb.ReindexRequest.START, "m", "p", "t:1")] * 2 + [(pb.ReindexRequest.ROLLBACK, "", "", "")]


def test_backoff_grows_and_is_jittered():
    policy = RetryPolicy(attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2, jitter=0.5)
    waits = list(policy.backoffs(random.Random(0)))
    assert len(waits) == 5
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert all(cap * 0.5 <= w <= cap for w, cap in zip(waits, caps))
    assert len({round(w / cap, 6) for w, cap in zip(waits, caps)}) > 1  # not all the same fraction
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_tls_with_a_root_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    search_pb2_grpc.add_SearchServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", tls_ca=cert, token="t") as client:
            assert client.stats().count == 3 and client.connection.tls
        with Client(f"localhost:{port}", tls_ca=cert.read_bytes(), server_name="localhost") as client:
            assert client.stats().count == 3
        with Client(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=1)) as plaintext:  # TLS only
            with pytest.raises(Unavailable):
                plaintext.stats(timeout=5)
    finally:
        server.stop(0)


def test_unauthenticated_has_a_hint():
    error = Unauthenticated(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token", "Stats", "h:1")
    assert str(error) == "Stats on h:1: UNAUTHENTICATED: missing or wrong bearer token. " \
                         "Pass token=... (CLI: --token-file FILE or COCA_SEARCH_TOKEN)"
