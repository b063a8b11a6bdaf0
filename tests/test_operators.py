"""Operators: the Prometheus endpoint and load shedding, against a real tritonserver (coca-tiny) and
the service in its own process. Every figure scraped is checked against the test's own tally of the
calls it made; the bounds and the rate limit against what each client was answered."""
from __future__ import annotations

import io
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.testing import triton_unavailable_reason

MODEL, PRETRAINED, SEED = "coca-tiny", "random", 0
needs_triton = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from search_service.pb import search_pb2 as pb  # noqa: E402
from search_service.testing import ServiceProcess, WireClient  # noqa: E402


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def repository(tiny_repository):
    return tiny_repository


@pytest.fixture(scope="module")
def triton(plain_triton):
    return plain_triton


def distinct_jpegs(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize((64, 64)), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 for a labelled series never observed (prometheus_client exports none)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(samples: dict, method: str, code: str) -> float:
    return sample(samples, "coca_search_request_duration_seconds_count", method=method, code=code)


def triton_calls(samples: dict, model: str) -> float:
    return sample(samples, "coca_search_triton_request_duration_seconds_count", model=model, outcome="ok")


def code_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


# ---------------------------------------------------------------- metrics
@needs_triton
def test_metrics_count_what_the_clients_did(tmp_path, triton, repository):
    args = ("--metrics-port", "0", "--max-inflight-caption", "1", "--max-caption-sequences", "1",
            "--max-queue-wait", "0", "--logit-scale", str(repository[1]))  # past a bound: refused at once
    with ServiceProcess(tmp_path / "data", triton.grpc_url, *args) as service, \
            WireClient(service.address, timeout=120) as client:
        url = service.metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:"), service.output()  # loopback, as --host
        empty = scrape(url)
        assert calls(empty, "SearchText", "OK") == 0 and sample(empty, "coca_search_items") == 0

        images = distinct_jpegs(6, seed=1)
        ids = [r.id for r in client.add_images(pb.AddImageRequest(image=data) for data in images)]
        texts = [f"metrics query number {i}" for i in range(5)]
        for text in texts + texts[:2]:  # 7 answered; 5 texts embedded by Triton, 2 from the cache
            assert client.search_text(text, k=3).hits
        invalid = [code_of(lambda: client.search_text(" ", k=3)), code_of(lambda: client.search_text("x", k=5000)),
                   code_of(lambda: client.search_text("", k=3))]
        assert invalid == [grpc.StatusCode.INVALID_ARGUMENT] * 3
        assert code_of(lambda: client.get("no-such-id")) == grpc.StatusCode.NOT_FOUND
        # one decoder sequence allowed: a search captioning 3 hits gets one, the others say why not
        hits = client.search_text(texts[0], k=3, with_captions=True).hits
        captioned = [h for h in hits if h.caption]
        refused = [h for h in hits if h.caption_error]
        assert len(captioned) + len(refused) == 3 and captioned and refused
        assert all("--max-caption-sequences" in h.caption_error for h in refused), refused
        # one Caption call at a time: callers released together are refused past the first
        codes, start = [], threading.Barrier(4)

        def caption():
            start.wait()
            codes.append(code_of(lambda: client.caption(image=images[0], max_tokens=6)))

        threads = [threading.Thread(target=caption) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        captions_ok, captions_shed = codes.count(grpc.StatusCode.OK), codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert captions_ok >= 1 and captions_shed >= 1 and captions_ok + captions_shed == 4, codes
        stored = sum(bool(client.get(i).caption) for i in ids)
        stats = client.stats()
        got = scrape(url)

    assert calls(got, "AddImages", "OK") == 1
    assert calls(got, "SearchText", "OK") == 8 and calls(got, "SearchText", "INVALID_ARGUMENT") == 3
    assert calls(got, "Get", "NOT_FOUND") == 1 and calls(got, "Get", "OK") == len(ids)
    assert calls(got, "Caption", "OK") == captions_ok and calls(got, "Caption", "RESOURCE_EXHAUSTED") == captions_shed
    assert sample(got, "coca_search_shed_total", bound="caption") == captions_shed
    assert sample(got, "coca_search_shed_total", bound="caption_sequences") == len(refused)
    # a histogram's count is its +Inf bucket, and every call took some time
    assert sample(got, "coca_search_request_duration_seconds_bucket", method="SearchText", code="OK", le="+Inf") == 8
    assert sample(got, "coca_search_request_duration_seconds_sum", method="SearchText", code="OK") > 0
    # Triton: one text-encoder call per text not cached, one image-encoder call per image added or captioned
    captions_made = len(captioned) + captions_ok
    assert triton_calls(got, "coca_text_encoder") == len(set(texts)) == stats.query_cache_misses
    assert triton_calls(got, "coca_image_encoder") == len(images) + captions_made
    assert triton_calls(got, "coca_text_decoder") >= 2 * captions_made  # START (+ steps) + END per caption
    assert sample(got, "coca_search_query_cache_hits_total") == stats.query_cache_hits == 3
    # the store, read at scrape time
    assert sample(got, "coca_search_items") == sample(got, "coca_search_indexed_items") == len(images)
    assert sample(got, "coca_search_captioned_items") == stored == len(captioned)
    assert sample(got, "coca_search_index_info", configured="Flat", active="Flat") == 1
    # the precision the export recorded (its manifest), as Triton's configs carry it
    from coca.precision import summary
    from serving.repository import read_manifest

    recorded = summary(read_manifest(repository[0])["precision"])
    assert stats.precision == recorded == "encoders fp32, decoder fp32 (fixed)"
    assert sample(got, "coca_search_model_precision_info", precision=recorded) == 1
    # queue depths back to zero, the bounds as configured
    for kind in ("search", "ingest", "caption", "caption_sequences"):
        assert sample(got, "coca_search_inflight", **{"class": kind}) == 0
    assert sample(got, "coca_search_inflight_limit", **{"class": "caption"}) == 1
    assert sample(got, "coca_search_inflight_limit", **{"class": "search"}) == 32  # the default


# ---------------------------------------------------------------- rate limit
@needs_triton
def test_the_rate_limit_is_a_token_bucket_per_token(tmp_path, triton):
    token_file = tmp_path / "tokens"
    token_file.write_text("alpha-token\nbeta-token\n")  # two clients, each its own token
    rate, burst = 2.0, 3
    args = ("--token-file", str(token_file), "--rate-limit", str(rate), "--rate-burst", str(burst))
    with ServiceProcess(tmp_path / "data", triton.grpc_url, *args) as service:
        assert service.metrics_url is None  # no --metrics-port: no endpoint

        def burst_of(client, n):
            started = time.monotonic()
            answers = []
            for _ in range(n):
                try:
                    client.get("no-such-id")
                except grpc.RpcError as exc:
                    answers.append((exc.code(), exc.details()))
            return answers, time.monotonic() - started

        with WireClient(service.address, token="alpha-token") as alpha, \
                WireClient(service.address, token="beta-token") as beta, \
                WireClient(service.address, token="wrong") as stranger:
            for client in (alpha, beta):  # each token: its burst, then refusals naming the rate limit
                answers, elapsed = burst_of(client, 12)
                admitted = [a for a in answers if a[0] == grpc.StatusCode.NOT_FOUND]
                refused = [a for a in answers if a[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
                assert len(admitted) + len(refused) == 12
                assert burst <= len(admitted) <= burst + int(rate * elapsed), (answers, elapsed)
                assert all("rate limit" in message and "--rate-limit" in message for _, message in refused)
            # a wrong token is refused as such, not counted against anyone's bucket
            assert code_of(lambda: stranger.get("no-such-id")) == grpc.StatusCode.UNAUTHENTICATED
            time.sleep(1.0)  # the bucket refills at `rate` per second
            answers, elapsed = burst_of(alpha, 6)
            admitted = sum(code == grpc.StatusCode.NOT_FOUND for code, _ in answers)
            assert 1 <= admitted <= int(rate * (1.0 + elapsed)) + 1, answers


# ---------------------------------------------------------------- bounds without a server
def test_admission_holds_and_sheds_per_class():
    from search_service.admission import CAPTION_SEQUENCES, Admission, Limits, Shed

    refused = []
    admission = Admission(Limits(search=2, caption=0, caption_sequences=1), on_shed=refused.append)
    with admission.hold("search"), admission.hold("search"):
        assert admission.inflight("search") == 2
        with pytest.raises(Shed) as info:
            with admission.hold("search"):
                pass
        assert info.value.bound == "search" and "--max-inflight-search" in str(info.value)
        with admission.hold(CAPTION_SEQUENCES):  # other classes have their own budgets
            with pytest.raises(Shed):
                with admission.hold(CAPTION_SEQUENCES):
                    pass
    held = [admission.hold("caption") for _ in range(100)]  # 0: no bound
    for slot in held:
        slot.__enter__()
    assert admission.inflight("search") == 0 and admission.inflight(CAPTION_SEQUENCES) == 0
    assert admission.inflight("caption") == 100 and refused == ["search", CAPTION_SEQUENCES]


def test_quiet_for_counts_from_the_last_search_or_caption_to_finish(monkeypatch):
    from search_service import admission as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    admission = module.Admission(module.Limits())
    kinds = (module.SEARCH, module.CAPTION)
    assert admission.quiet_for(kinds) == float("inf")  # none ever
    with admission.hold(module.SEARCH):
        assert admission.quiet_for(kinds) == 0.0  # one in flight
    now[0] += 0.5
    with admission.hold(module.INGEST):  # an ingest is not what a reindex gives way to
        assert admission.quiet_for(kinds) == pytest.approx(0.5)


def test_the_reindex_throttle_keeps_its_share_of_the_time_while_searches_run(monkeypatch):
    """reindex.Throttle: with searches about, 2-image chunks, each followed by a wait of 1/share - 1 times its
    Triton time; with none about, one call for the whole batch."""
    import asyncio

    from search_service import reindex

    clock, calls, busy = [0.0], [], [True]
    monkeypatch.setattr(reindex.time, "monotonic", lambda: clock[0])

    async def sleep(seconds):
        clock[0] += seconds

    class Triton:  # each image takes 10 ms
        async def embed_images_each(self, data, timeout):
            calls.append((clock[0], len(data)))
            clock[0] += 0.01 * len(data)
            return [f"v{image}" for image in data]

    monkeypatch.setattr(reindex.asyncio, "sleep", sleep)
    throttle = reindex.Throttle(lambda: 0.0 if busy[0] else 1.0, share=0.1)
    out = asyncio.run(throttle.embed(Triton(), list(range(6)), 60))
    assert out == [f"v{i}" for i in range(6)]  # in order
    assert [n for _, n in calls] == [2, 2, 2]
    assert [round(t, 3) for t, _ in calls] == [0.0, 0.2, 0.4]  # 20 ms busy, 180 ms given way: 10%
    busy[0], calls[:] = False, []
    asyncio.run(throttle.embed(Triton(), list(range(32)), 60))
    assert [n for _, n in calls] == [32]


def test_token_bucket_arithmetic(monkeypatch):
    from search_service import admission as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    buckets = module._TokenBuckets(rate=4.0, burst=2)
    assert [buckets.take("a"), buckets.take("a")] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.25)  # empty: one token in 1/rate s
    assert buckets.take("b") == 0.0  # another caller: its own bucket
    now[0] += 0.125  # half a token
    assert buckets.take("a") == pytest.approx(0.125)
    now[0] += 10.0  # refills to the burst, no further
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.25)]


@pytest.mark.parametrize("flag,value", [("--max-inflight-search", "-1"), ("--rate-limit", "-2"),
                                        ("--rate-limit", "nan"), ("--metrics-port", "70000"),
                                        ("--reindex-share", "0"), ("--reindex-share", "1.5"),
                                        ("--reindex-share", "nan")])
def test_bad_operator_flags_exit_2_with_one_line(tmp_path, capsys, flag, value):
    from search_service.server import main

    assert main(["--data", str(tmp_path / "data"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search service: error:"), err


def test_admission_queues_past_the_bound_then_sheds_with_a_retry_hint():
    """Past the bound a request waits (first come, first served) for a slot up to queue_wait_s and its own
    deadline, in a queue as long as the bound; then Shed with a hint. (Old code: refused at once.)"""
    import asyncio

    from search_service.admission import RETRY_AFTER_KEY, Admission, Limits, Shed

    async def run():
        admission = Admission(Limits(search=1, queue_wait_s=0.5))
        order = []

        async def search(name, hold_s, time_left=None):
            async with admission.admitted("search", time_left):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(search("first", 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(search("second", 0.0))  # waits ~0.2 s for first's slot
        await asyncio.sleep(0.01)
        with pytest.raises(Shed) as full:  # the queue (as long as the bound, 1) is full: refused at once
            await search("third", 0.0)
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and admission.inflight("search") == 0
        hint = dict(full.value.trailing_metadata())[RETRY_AFTER_KEY]
        assert 50 <= int(hint) <= 5000, hint

        blocker = asyncio.create_task(search("blocker", 1.0))
        await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Shed):  # half its time left (0.2 s) ends the wait before queue_wait_s
            await search("late", 0.0, time_left=0.2)
        assert 0.09 <= asyncio.get_running_loop().time() - started < 0.4
        assert admission.waiting("search") == 0
        await blocker
        assert admission.inflight("search") == 0

    asyncio.run(run())


def test_caption_bounds_default_to_the_decoders_capacity():
    from search_service.admission import CAPTION_SEQUENCES, Admission, Limits

    admission = Admission(Limits())
    assert admission.capacity_outdated("a") and admission.bound("caption") == 0  # unknown yet: not refused
    admission.set_decoder_capacity(48, "a")
    assert admission.bound("caption") == admission.bound(CAPTION_SEQUENCES) == 48
    assert not admission.capacity_outdated("a")
    assert admission.capacity_outdated("b")  # other endpoints in rotation: read again
    assert Admission(Limits(caption=3)).bound("caption") == 3


def test_a_beam_search_holds_a_decoder_row_per_beam():
    """Review item 6: the decoder-row bound counts num_beams rows per sequence (a beam search holds one KV-cache
    row per beam). Old code: one unit per sequence, so num_beams=4 admitted 4x what the decoders hold."""
    from search_service.admission import CAPTION_SEQUENCES, Admission, Limits, Shed

    admission = Admission(Limits())
    admission.set_decoder_capacity(8, "endpoints")
    with admission.hold(CAPTION_SEQUENCES, 4), admission.hold(CAPTION_SEQUENCES, 3):
        assert admission.inflight(CAPTION_SEQUENCES) == 7
        with pytest.raises(Shed):  # 7 + 4 rows > 8
            with admission.hold(CAPTION_SEQUENCES, 4):
                pass
        with admission.hold(CAPTION_SEQUENCES, 1):  # the last row
            assert admission.inflight(CAPTION_SEQUENCES) == 8
    assert admission.inflight(CAPTION_SEQUENCES) == 0
    with admission.hold(CAPTION_SEQUENCES, 16):  # more than the whole bound: takes all of it
        assert admission.inflight(CAPTION_SEQUENCES) == 8
    assert admission.inflight(CAPTION_SEQUENCES) == 0


def test_a_decoder_row_shed_carries_a_hint_from_the_rows_hold_times(monkeypatch):
    """Review item 7: a shed for decoder rows hints when rows free: their mean hold time x rows held / the
    bound. Old code: always the 50 ms floor, so clients spent their attempts at once."""
    from search_service import admission as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    admission = module.Admission(module.Limits(caption_sequences=2))
    for _ in range(20):  # sequences of 2 s each: the running mean converges on 2 s
        with admission.hold(module.CAPTION_SEQUENCES):
            now[0] += 2.0
    expected = 2.0 * (1 - (1 - module.HOLD_EWMA) ** 20)
    with admission.hold(module.CAPTION_SEQUENCES, 2):  # both rows held
        with pytest.raises(module.Shed) as info:
            with admission.hold(module.CAPTION_SEQUENCES):
                pass
    assert info.value.retry_after_s == pytest.approx(expected * 2 / 2)
    assert dict(info.value.trailing_metadata())[module.RETRY_AFTER_KEY] == str(round(expected * 1000))


def test_the_decoder_capacity_is_summed_over_the_endpoints_in_rotation_and_read_again_when_they_change():
    """Review item 6: the caption bounds are the sum of capacity_rows over the Triton endpoints in rotation
    (old code: one endpoint's, for all of them), and are read again when the rotation changes (an endpoint
    out or back, a restarted server on a new connection, another export); old code: read once, never again.
    The endpoints here answer get_model_config from stand-ins; the health refresh's code path learns them."""
    import asyncio
    from types import SimpleNamespace

    from search_service.admission import CAPTION_SEQUENCES, Admission, Limits
    from search_service.models import Models
    from search_service.server import _learn_decoder_capacity

    async def run():
        models = Models("127.0.0.1:1,127.0.0.1:2")
        capacity = {"127.0.0.1:1": 48, "127.0.0.1:2": 64}
        for endpoint in models.pool.endpoints:
            async def answer(fn, counted=True, url=endpoint.url):
                config = {"config": {"parameters": {"capacity_rows": {"string_value": str(capacity[url])}}}}
                client = SimpleNamespace(get_model_config=lambda name, as_json: asyncio.sleep(0, config))
                return await fn(SimpleNamespace(client=client))
            endpoint.run = answer
        servicer = SimpleNamespace(models=models, admission=Admission(Limits()))

        async def refresh() -> int:  # what LiveHealth.refresh does once Triton answers
            if servicer.admission.capacity_outdated(models.capacity_source()):
                await _learn_decoder_capacity(servicer)
            return servicer.admission.bound(CAPTION_SEQUENCES)

        assert await refresh() == 48 + 64
        capacity["127.0.0.1:1"] = 8  # unchanged rotation: not asked again
        assert await refresh() == 48 + 64
        second = models.pool.endpoints[1]
        second.healthy = False  # out of rotation
        assert await refresh() == 8
        capacity["127.0.0.1:2"] = 16  # restarted with another capacity: back on a new connection
        second.generation += 1
        second.healthy = True
        assert await refresh() == 8 + 16
        assert servicer.admission.bound("caption") == 8 + 16
        await models.close()

    asyncio.run(run())
