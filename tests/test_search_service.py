"""The search service end to end: a real tritonserver (coca-tiny, random weights), the real gRPC
server in its own process, real SQLite and FAISS. One Triton serves the module; services are
started per test where a test kills, restarts or reconfigures one."""
from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from search_service.pb import search_pb2 as pb  # noqa: E402
from search_service.testing import ServiceProcess, WireClient, wait_for  # noqa: E402
from tests.test_search_store import bm25_oracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL, PRETRAINED, SEED = "coca-tiny", "random", 0
ADDED, DUPLICATE, FAILED = pb.AddImageResult.ADDED, pb.AddImageResult.DUPLICATE, pb.AddImageResult.FAILED


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def repository(tiny_repository):
    return tiny_repository


@pytest.fixture(scope="module")
def triton(plain_triton):
    """The session's tritonserver (fixed ports: a test can stop it and start it again at the same address)."""
    return plain_triton


@pytest.fixture(scope="module")
def reference():
    import coca

    return coca.load(MODEL, pretrained=PRETRAINED, seed=SEED)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("root")
    (root / "ok.jpg").write_bytes(jpeg(Image.new("RGB", (80, 60), (20, 40, 220))))  # indexed by path only
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(photos[1])
    (root / "escape.jpg").symlink_to(outside)
    return root, outside


def store_args(request, name: str) -> tuple[str, ...]:
    """Service flags for the vector store a parametrised fixture asks for (a fresh Milvus collection each)."""
    if request.param == "faiss":
        return ()
    server = request.getfixturevalue("milvus_server")
    return ("--vector-store", "milvus", "--milvus-uri", server.uri, "--collection", f"{name}_{time.time_ns()}")


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def service(request, tmp_path_factory, triton, repository, roots):
    """The service most tests share (its own data dir), over each vector store: the same tests run on both."""
    with ServiceProcess(tmp_path_factory.mktemp("data"), triton.grpc_url, "--root", str(roots[0]),
                        "--logit-scale", str(repository[1]), "--field", "year:number", *store_args(request, "e2e")
                        ) as process:
        process.vector_store = request.param
        yield process


def triton_side_only(service) -> None:
    """Tests of what Triton and the service do around the store run on the embedded store only: on Milvus
    they would repeat the same Triton restarts (minutes of CI) and learn nothing new about the store."""
    if service.vector_store != "faiss":
        pytest.skip("store-independent: run on the embedded store")


@pytest.fixture
def client(service):
    with WireClient(service.address, timeout=60) as c:
        yield c


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def add(client, images, **fields) -> list[pb.AddImageResult]:
    return list(client.add_images(pb.AddImageRequest(image=data, **fields) for data in images))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value




# ---------------------------------------------------------------- tests
def test_index_search_caption_end_to_end(client, photos, reference):
    results = add(client, photos[:6], metadata={"set": "e2e"})
    assert [r.outcome for r in results] == [ADDED] * 6 and [r.index for r in results] == list(range(6))
    ids = [r.id for r in results]
    # Stored embeddings are the model's (Triton equals in-process).
    stored = np.array(client.get(ids[2], include_embedding=True).embedding)
    np.testing.assert_allclose(stored, reference.embed_images([photos[2]])[0], atol=1e-5)
    # An image finds itself; text search ranks by the in-process cosine similarity.
    top = client.search_image(photos[4], k=3, filters={"set": "e2e"}).hits
    assert top[0].id == ids[4] and top[0].score == pytest.approx(1.0, abs=1e-4)
    hits = client.search_text("a photo of a cat", k=6, filters={"set": "e2e"}).hits
    expected = reference.embed_images(photos[:6]) @ reference.embed_texts(["a photo of a cat"])[0]
    assert [h.id for h in hits] == [ids[i] for i in np.argsort(-expected)]
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=1e-4)
    assert all(h.caption == "" for h in hits)
    # with_captions: captioned through Triton's decoder, equal to in-process greedy captions, stored.
    captioned = client.search_text("a photo of a cat", k=3, with_captions=True, filters={"set": "e2e"}).hits
    by_id = {ids[i]: photos[i] for i in range(6)}
    for hit in captioned:
        assert hit.caption and hit.caption == reference.caption([by_id[hit.id]])[0].text
        assert client.get(hit.id).caption == hit.caption
    again = client.search_text("a photo of a cat", k=3, with_captions=True, filters={"set": "e2e"}).hits
    assert [(h.id, h.caption) for h in again] == [(h.id, h.caption) for h in captioned]
    # The bytes are kept, content-addressed: Get gives them back.
    assert client.get(ids[1], include_image=True).image == photos[1]


def test_a_repeated_query_comes_from_the_cache_and_stats_count_it(client, photos, reference):
    images = noisy_variants(photos[:1], 3)  # new content: its metadata is this test's
    assert [r.outcome for r in add(client, images, metadata={"set": "cache"})] == [ADDED] * 3
    text = "a query text nobody else searches for"
    before = client.stats()
    first = client.search_text(text, k=3, filters={"set": "cache"}).hits
    second = client.search_text(text, k=3, filters={"set": "cache"}).hits
    after = client.stats()
    assert (after.query_cache_misses - before.query_cache_misses, after.query_cache_hits - before.query_cache_hits) == (1, 1)
    assert [(h.id, h.score) for h in second] == [(h.id, h.score) for h in first]
    expected = np.sort(reference.embed_images(images) @ reference.embed_texts([text])[0])[::-1]
    np.testing.assert_allclose([h.score for h in second], expected, atol=1e-4)


def test_text_embedding_cache_drops_the_least_recently_used():
    from search_service.models import TextEmbeddingCache

    cache = TextEmbeddingCache(2)
    cache.put("a", np.zeros(2))
    cache.put("b", np.ones(2))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", np.full(2, 2.0))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats() == {"query_cache_hits": 3, "query_cache_misses": 1, "query_cache_entries": 2}
    off = TextEmbeddingCache(0)
    off.put("a", np.zeros(2))
    assert off.get("a") is None


def test_duplicates_share_one_id_and_one_vector(client, photos):
    before = client.stats().count
    first = add(client, [photos[6], photos[6]])  # twice in one stream
    assert first[0].outcome == ADDED and first[1].outcome == DUPLICATE and first[0].id == first[1].id
    again = add(client, [photos[6]], id="another-name")  # later, under another requested id
    assert again[0].outcome == DUPLICATE and again[0].id == first[0].id
    stats = client.stats()
    assert stats.count == before + 1 and stats.indexed == stats.count
    clash = add(client, [photos[7]], id=first[0].id)[0]  # an explicit id naming other content
    assert clash.outcome == FAILED and clash.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert first[0].id in clash.error.message


def test_delete_removes_from_store_and_index(client, photos):
    item = add(client, [photos[8]], metadata={"set": "delete"})[0]
    assert client.search_image(photos[8], k=1).hits[0].id == item.id
    assert client.delete(item.id).id == item.id
    assert rpc_error(client.get, item.id).code() == grpc.StatusCode.NOT_FOUND
    assert client.search_text("anything", k=10, filters={"set": "delete"}).hits == []
    assert all(h.id != item.id for h in client.search_image(photos[8], k=50).hits)
    error = rpc_error(client.delete, item.id)
    assert error.code() == grpc.StatusCode.NOT_FOUND and item.id in error.details()
    stats = client.stats()
    assert stats.indexed == stats.count


def test_filters_min_score_and_k(client, photos):
    add(client, photos[9:11], metadata={"set": "filters", "colour": "red"})
    add(client, photos[11:12], metadata={"set": "filters", "colour": "blue"})
    red = client.search_text("a photo", k=10, filters={"set": "filters", "colour": "red"}).hits
    assert len(red) == 2 and {h.metadata["colour"] for h in red} == {"red"}
    assert len(client.search_text("a photo", k=1, filters={"set": "filters"}).hits) == 1
    everything = client.search_text("a photo", k=3, filters={"set": "filters"}).hits
    cut = (everything[0].score + everything[-1].score) / 2
    above = client.search_text("a photo", k=3, filters={"set": "filters"}, min_score=cut).hits
    assert [h.id for h in above] == [h.id for h in everything if h.score >= cut] and 0 < len(above) < 3


def where(field: str, negate: bool = False, **test) -> pb.Condition:
    if "any_of" in test:
        test["any_of"] = pb.ValueList(values=test["any_of"])
    if "range" in test:
        test["range"] = pb.Range(**test["range"])
    return pb.Condition(field=field, negate=negate, **test)


def test_conditions_order_and_pages_match_exact_search(request, client, photos, reference):
    """IN, NOT, ranges (added_at; a declared number field), order by a field and page tokens, through
    gRPC, against exact search over what this test stored; Milvus refuses what it cannot do, naming itself."""
    on_milvus = request.node.callspec.params["service"] == "milvus"
    images = noisy_variants(photos[3:4], 6)
    years, colours = ["1999", "2005", "2010", "x", "2020", "2005"], ["red", "blue", "red", "green", "blue", "red"]
    requests = [pb.AddImageRequest(image=data, metadata={"set": "where", "year": y, "colour": c})
                for data, y, c in zip(images, years, colours) if y != "x"]
    requests.insert(3, pb.AddImageRequest(image=images[3], metadata={"set": "where", "colour": "green"}))  # no year
    ids = [r.id for r in client.add_images(requests[:3])]
    time.sleep(0.05)  # a second batch, later: a range over added_at splits them
    ids += [r.id for r in client.add_images(requests[3:])]
    added = [client.get(i).created_at for i in ids]
    assert len(set(ids)) == 6 and added[3] > added[2]
    scores = reference.embed_images(images) @ reference.embed_texts(["a photo"])[0]

    def search(*conditions, k=10, token="", order=None):
        options = pb.SearchOptions(k=k, filters={"set": "where"}, where=conditions, page_token=token, order_by=order)
        return client.stub.SearchText(pb.SearchTextRequest(text="a photo", options=options), timeout=60)

    def exact(passing):
        return [ids[i] for i in sorted(passing, key=lambda i: -scores[i])]

    # IN and NOT, AND-ed: red or blue, and not 2005.
    hits = search(where("colour", any_of=["red", "blue"]), where("year", equals="2005", negate=True)).hits
    assert [h.id for h in hits] == exact([0, 2, 4])
    np.testing.assert_allclose([h.score for h in hits], sorted(scores[[0, 2, 4]], reverse=True), atol=1e-4)
    assert [h.added_at for h in hits] == [added[ids.index(h.id)] for h in hits]
    # A range over added_at (ISO 8601): the second batch.
    middle = datetime.datetime.fromtimestamp((added[2] + added[3]) / 2, datetime.timezone.utc).isoformat()
    assert [h.id for h in search(where("added_at", range={"gte": middle})).hits] == exact([3, 4, 5])
    # Pages of k=2: the exact ranking's slices, then no token.
    pages, token = [], ""
    for _ in range(4):
        response = search(k=2, token=token)
        pages.append([h.id for h in response.hits])
        token = response.next_page_token
        if not token:
            break
    assert sum(pages, []) == exact(range(6)) and [len(p) for p in pages] == [2, 2, 2] and not token
    listing = client.stub.List(pb.ListRequest(filters={"set": "where"}, page_size=4), timeout=60)
    rest = client.stub.List(pb.ListRequest(filters={"set": "where"}, page_size=4, page_token=listing.next_page_token),
                            timeout=60)
    assert listing.total == rest.total == 6 and not rest.next_page_token
    listed = [i.id for i in listing.items] + [i.id for i in rest.items]
    expected_order = sorted(ids, key=lambda i: client.get(i).content_sha256) if on_milvus else ids
    assert listed == expected_order and len(listing.items) == 4
    # A number range and an order by it: the embedded store does them; Milvus (metadata as strings) refuses.
    in_range, by_year = (where("year", range={"gte": "2000", "lt": "2020"}),), pb.Order(field="year", descending=True)
    if on_milvus:
        for call in (lambda: search(*in_range), lambda: search(order=by_year)):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "Milvus" in error.details()
    else:
        assert [h.id for h in search(*in_range).hits] == exact([1, 2, 5])
        assert [h.id for h in search(order=by_year, k=4).hits] == [ids[i] for i in (4, 2, 1, 5)]
        newest = client.stub.List(pb.ListRequest(filters={"set": "where"}, order_by=pb.Order(field="added_at",
                                                                                             descending=True)))
        assert [i.id for i in newest.items] == sorted(ids, key=lambda i: (-added[ids.index(i)], ids.index(i)))
    # Bad input: named, INVALID_ARGUMENT.
    for call, words in [(lambda: search(where("colour", range={"gte": "a"})), "range on 'colour'"),
                        (lambda: search(where("year", range={})), "at least one bound"),
                        (lambda: search(where("added_at", range={"gte": "soon"})), "ISO 8601"),
                        (lambda: search(token="not-a-token"), "page_token"),
                        (lambda: search(where("colour", equals="red"), token=search(k=2).next_page_token), "another query"),
                        (lambda: search(order=pb.Order(field="colour")), "order by 'colour'")]:
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()


def test_keyword_and_hybrid_search_over_captions(request, client, photos):
    """KEYWORD hits are the items whose caption holds a word of the query, by BM25 (the test's own); HYBRID is
    the reciprocal-rank fusion of the VECTOR and KEYWORD lists; Milvus answers FAILED_PRECONDITION naming itself."""
    images = noisy_variants([photos[0], photos[6], photos[9], photos[11]], 4)
    assert [r.outcome for r in add(client, images, metadata={"set": "words"})] == [ADDED] * 4
    if request.node.callspec.params["service"] == "milvus":
        error = rpc_error(client.stub.SearchText, pb.SearchTextRequest(text="a cat", mode=pb.SearchTextRequest.KEYWORD))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "Milvus" in error.details()
        return
    client.search_text("a photo", k=4, with_captions=True, filters={"set": "words"})  # captions them (stored)
    captions = {}
    token = ""
    while True:  # every caption in the store: BM25 counts the whole collection
        page = client.stub.List(pb.ListRequest(page_size=100, page_token=token), timeout=60)
        captions.update((i.id, i.caption) for i in page.items if i.caption)
        token = page.next_page_token
        if not token:
            break
    mine = [i.id for i in client.stub.List(pb.ListRequest(filters={"set": "words"})).items]
    word = "".join(ch.lower() if ch.isalnum() else " " for ch in captions[mine[0]]).split()[0]
    text = f"{word} zzqx"  # a second word no caption holds

    def search(mode, k=10, **extra):
        options = pb.SearchOptions(k=k, filters={"set": "words"})
        return client.stub.SearchText(pb.SearchTextRequest(text=text, options=options, mode=mode, **extra),
                                      timeout=60).hits

    relevance = bm25_oracle(text, captions)
    expected = sorted((i for i in relevance if i in mine), key=lambda i: (-relevance[i], i))
    hits = search(pb.SearchTextRequest.KEYWORD)
    assert [h.id for h in hits] == expected and mine[0] in expected
    np.testing.assert_allclose([h.score for h in hits], [relevance[i] for i in expected], rtol=1e-4)
    assert [h.keyword_rank for h in hits] == list(range(1, len(hits) + 1))
    vector = client.search_text(text, k=4, filters={"set": "words"}).hits
    for weight in (0.5, 0.8):
        fused = {}
        for rank, h in enumerate(vector, 1):
            fused[h.id] = (1 - weight) / (60 + rank)
        for rank, h in enumerate(hits, 1):
            fused[h.id] = fused.get(h.id, 0.0) + weight / (60 + rank)
        hybrid = search(pb.SearchTextRequest.HYBRID, k=3, keyword_weight=weight)
        assert [h.id for h in hybrid] == sorted(fused, key=lambda i: (-fused[i], i))[:3]
        np.testing.assert_allclose([h.score for h in hybrid], sorted(fused.values(), reverse=True)[:3], rtol=1e-5)
    error = rpc_error(search, pb.SearchTextRequest.HYBRID, keyword_weight=1.5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "keyword_weight" in error.details()


def test_caption_on_ingest_is_stored_and_found_by_words(request, client, photos, reference):
    images = noisy_variants(photos[5:6], 2)
    results = list(client.add_images(pb.AddImageRequest(image=data, metadata={"set": "ingest"},
                                                        options=pb.AddOptions(caption=True)) for data in images))
    assert [r.outcome for r in results] == [ADDED, ADDED]
    for result, data in zip(results, images):
        assert result.caption == reference.caption([data])[0].text and not result.caption_error
        assert client.get(result.id).caption == result.caption
    if request.node.callspec.params["service"] == "faiss":
        word = "".join(ch.lower() if ch.isalnum() else " " for ch in results[0].caption).split()[0]
        found = client.stub.SearchText(pb.SearchTextRequest(text=word, mode=pb.SearchTextRequest.KEYWORD,
                                                            options=pb.SearchOptions(filters={"set": "ingest"})))
        assert results[0].id in [h.id for h in found.hits]


def stored_embeddings(client) -> dict[str, np.ndarray]:
    """Every item's stored embedding, through List (the oracle's view of the collection)."""
    out, token = {}, ""
    while True:
        page = client.stub.List(pb.ListRequest(page_size=50, page_token=token, include_embeddings=True), timeout=60)
        out.update((i.id, np.array(i.embedding, np.float64)) for i in page.items)
        token = page.next_page_token
        if not token:
            return out


def test_near_duplicates_on_add_and_find_duplicates(client, photos, reference):
    """NEAR_DUPLICATE names the closest stored item (earlier items of the stream included) with its exact score;
    FindDuplicates' pages are the connected components of the exact pairs above the threshold."""
    variants = noisy_variants(photos[2:3], 3)
    assert add(client, photos[2:3])[0].outcome in (ADDED, DUPLICATE)  # the original (maybe stored already)
    before = stored_embeddings(client)
    vectors = reference.embed_images(variants).astype(np.float64)
    ids, matrix = list(before), np.stack(list(before.values()))
    best0 = int(np.argmax(matrix @ vectors[0]))
    score0, score1 = float(matrix[best0] @ vectors[0]), max(float((matrix @ vectors[1]).max()), float(vectors[0] @ vectors[1]))
    threshold = min(score0, score1) - 1e-3
    options = [pb.AddOptions(near_duplicate_threshold=threshold), pb.AddOptions(near_duplicate_threshold=threshold,
               skip_near_duplicates=True), pb.AddOptions(near_duplicate_threshold=1.0)]
    results = list(client.add_images(pb.AddImageRequest(image=v, options=o) for v, o in zip(variants, options)))
    NEAR = pb.AddImageResult.NEAR_DUPLICATE
    assert [r.outcome for r in results] == [NEAR, NEAR, ADDED], results
    assert results[0].near_duplicate.id == ids[best0] and results[0].id
    assert results[0].near_duplicate.score == pytest.approx(score0, abs=1e-4)
    assert results[1].id == "" and results[1].near_duplicate.score == pytest.approx(score1, abs=1e-4)
    after = stored_embeddings(client)
    assert set(after) == set(before) | {results[0].id, results[2].id}  # the skipped one was not stored
    bad_threshold = list(client.add_images([pb.AddImageRequest(image=variants[1], options=pb.AddOptions(
        near_duplicate_threshold=1.5))]))[0]
    assert bad_threshold.outcome == FAILED and "near_duplicate_threshold" in bad_threshold.error.message

    ids, matrix = list(after), np.stack(list(after.values()))
    scores = matrix @ matrix.T
    upper = np.sort(scores[np.triu_indices(len(ids), 1)])[::-1][: max(2, len(ids) // 3)]
    gap = int(np.argmax(upper[:-1] - upper[1:]))  # a threshold in the widest gap: no pair sits on it
    cut = float(upper[gap] + upper[gap + 1]) / 2
    pairs = {(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)) if scores[i, j] >= cut}
    expected = components(pairs)
    groups, token, pages = [], "", 0
    while True:
        response = client.stub.FindDuplicates(pb.FindDuplicatesRequest(threshold=cut, page_size=2, neighbors=100,
                                                                       page_token=token), timeout=120)
        groups += response.groups
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert response.total_groups == len(expected) == len(groups) and pages == max(1, -(-len(expected) // 2))
    assert {frozenset(g.ids) for g in groups} == expected
    assert [len(g.ids) for g in groups] == sorted((len(g.ids) for g in groups), reverse=True)
    for group in groups:
        for pair in group.pairs:
            assert pair.score == pytest.approx(scores[ids.index(pair.a), ids.index(pair.b)], abs=1e-4)
    error = rpc_error(client.stub.FindDuplicates, pb.FindDuplicatesRequest(threshold=2.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold" in error.details()


def components(pairs: set[tuple[str, str]]) -> set[frozenset]:
    groups: list[set] = []
    for a, b in pairs:
        touching = [g for g in groups if a in g or b in g]
        merged = set().union({a, b}, *touching)
        groups = [g for g in groups if g not in touching] + [merged]
    return {frozenset(g) for g in groups}


def test_bad_items_fail_alone(client, photos, roots):
    root, outside = roots
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP in a few kB
    truncated = photos[3][: len(photos[3]) // 2]
    requests = [
        pb.AddImageRequest(image=jpeg(Image.new("RGB", (64, 48), (200, 10, 10)))),  # 0 good
        pb.AddImageRequest(image=b"this is not an image"),  # 1
        pb.AddImageRequest(image=truncated),  # 2 decodes header, fails in the model
        pb.AddImageRequest(image=bomb.getvalue()),  # 3
        pb.AddImageRequest(path=str(outside)),  # 4 absolute, outside the roots
        pb.AddImageRequest(path="escape.jpg"),  # 5 symlink out of the root
        pb.AddImageRequest(path="../outside/secret.jpg"),  # 6
        pb.AddImageRequest(path="missing.jpg"),  # 7
        pb.AddImageRequest(path="ok.jpg"),  # 8 good, server-side
        pb.AddImageRequest(),  # 9 nothing
        pb.AddImageRequest(image=jpeg(Image.new("RGB", (48, 64), (10, 200, 10)))),  # 10 good
    ]
    results = list(client.add_images(requests))
    assert [r.index for r in results] == list(range(len(requests)))
    code = {r.index: grpc.StatusCode.OK.value[0] if r.outcome != FAILED else r.error.code for r in results}
    expect = {1: "INVALID_ARGUMENT", 2: "INVALID_ARGUMENT", 3: "INVALID_ARGUMENT", 4: "PERMISSION_DENIED",
              5: "PERMISSION_DENIED", 6: "PERMISSION_DENIED", 7: "NOT_FOUND", 9: "INVALID_ARGUMENT"}
    for index, name in expect.items():
        assert code[index] == grpc.StatusCode[name].value[0], (index, results[index])
    assert "decompression bomb" in results[3].error.message and "not an image" in results[1].error.message
    assert "outside the allowed roots" in results[4].error.message and "'..'" in results[6].error.message
    assert all(results[i].outcome in (ADDED, DUPLICATE) for i in (0, 8, 10))
    assert client.get(results[8].id).uri == f"file://{(root / 'ok.jpg').resolve()}"


def test_a_stream_broken_by_a_message_that_does_not_parse_acknowledges_what_came_before(service, client, photos):
    good = [pb.AddImageRequest(image=data).SerializeToString() for data in noisy_variants(photos[4:5], 3)]
    broken = b"\x12\x02\xff\xfe"  # field 2 (path) holding non-UTF-8: the message does not parse
    before = client.stats().count
    with grpc.insecure_channel(service.address) as channel:
        add_raw = channel.stream_stream("/coca.search.v1.SearchService/AddImages",
                                        response_deserializer=pb.AddImageResult.FromString)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for result in add_raw(iter([*good, broken, good[0]]), timeout=60):
                received.append(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed request message" in info.value.details()
    assert [(r.index, r.outcome) for r in received] == [(0, ADDED), (1, ADDED), (2, ADDED)]  # committed, then said so
    assert client.stats().count == before + 3


def test_bad_requests_get_the_right_status(service, client, photos):
    def status(call, *args, **kwargs):
        error = rpc_error(call, *args, **kwargs)
        return error.code(), error.details()

    for k in (-1, 5000):
        code, message = status(client.search_text, "a cat", k=k)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "k must be in [1, 1000]" in message
    code, message = status(client.search_text, "   ")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text is empty" in message
    code, message = status(client.search_text, "a cat", min_score=3.0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_score" in message
    for call, args in [(client.get, ("nope",)), (client.delete, ("nope",)), (client.search_image, (None, "nope"))]:
        code, message = status(call, *args)
        assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in message
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    code, message = status(client.search_image, bomb.getvalue())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "decompression bomb" in message
    code, message = status(client.caption, image=photos[0], top_p=2.0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in message
    code, message = status(client.classify, [], image=photos[0])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label" in message
    for template in ("no slot", "{} and {}", "{0}{1}", "{"):  # the last three were INTERNAL errors (fuzz suite)
        code, message = status(client.classify, ["cat"], image=photos[0], template=template)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "template" in message, (template, message)
    code, message = status(client.search_text, "a cat", timeout=0.001)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Bytes that do not parse as the request (field 1 "text" holding non-UTF-8) are refused in words.
    with grpc.insecure_channel(service.address) as channel:
        search_raw = channel.unary_unary("/coca.search.v1.SearchService/SearchText")
        code, message = status(search_raw, b"\x0a\x02\xff\xfe", timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request message" in message
    assert client.search_text("a cat", k=1).hits  # still serving


def test_inputs_past_their_bounds_are_invalid_argument(client, photos):
    """Every unbounded input of the review has a bound now, named in the error; nothing is stored."""
    def refused(call, *args, **kwargs) -> str:
        error = rpc_error(call, *args, **kwargs)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        return error.details()

    assert "text is 1001 characters long, over the limit of 1000" in refused(client.search_text, "a" * 1001)
    assert "text #2 is 1001 characters long" in refused(client.rank, ["a cat", "b" * 1001], image=photos[0])
    assert "50000 per request" in refused(client.rank, ["word " * 199] * 60, image=photos[0])  # 59,700 characters
    assert "prompt #1 is" in refused(client.classify, ["cat"], image=photos[0], template="{} " + "x" * 1000)
    for beams in (17, 64):  # 64 took the whole decoder cache; more answered "busy", though it could never fit
        assert "num_beams must be in [1, 16]" in refused(client.caption, image=photos[0], num_beams=beams)
    assert "repetition_penalty must be in [0.1, 10]" in refused(client.caption, image=photos[0], repetition_penalty=1e-30)
    before = client.stats().count
    fresh = noisy_variants(photos[5:6], 3)
    uris = ["x" * 4097, "evil\x1b[2J\x1b[31mname.jpg", "f\u202egpj.exe", "фото 1.jpg"]  # the last one is fine
    results = list(client.add_images(pb.AddImageRequest(image=data, uri=uri) for data, uri in zip(fresh + fresh[:1], uris)))
    assert [r.outcome for r in results] == [FAILED, FAILED, FAILED, ADDED]
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in results[:3])
    assert "over the limit of 4096" in results[0].error.message and "control character" in results[1].error.message
    assert client.stats().count == before + 1 and client.get(results[3].id).uri == "фото 1.jpg"
    assert client.search_text("a" * 1000, k=1).hits  # at the bound: served


def test_search_with_captions_runs_a_bounded_pool_and_keeps_each_caption_as_it_finishes(service, client, triton,
                                                                                         photos, reference):
    """k hits to caption start at most `caption_workers` (8) decoder sequences at once (before: all k at
    once), and each caption is stored when it is made (before: all together at the end)."""
    triton_side_only(service)
    from serving.client import TritonCoca

    images = noisy_variants(photos[6:9], 24)
    ids = [r.id for r in add(client, images, metadata={"set": "fanout"})]
    decoding, stored_counts, done = [], [], threading.Event()

    def watch_triton():
        async def poll():
            async with TritonCoca(triton.grpc_url) as t:
                while not done.is_set():
                    decoding.append((await t.decoder_stats())["decoding_sequences"])
        asyncio.run(poll())

    def watch_store():  # one search reads the hits' captions in one query: a consistent count
        while not done.is_set():
            hits = client.search_text("a photo", k=24, filters={"set": "fanout"}).hits
            stored_counts.append(sum(1 for h in hits if h.caption))

    watchers = [threading.Thread(target=watch_triton), threading.Thread(target=watch_store)]
    for w in watchers:
        w.start()
    try:
        hits = client.search_text("a photo", k=24, with_captions=True, filters={"set": "fanout"}).hits
    finally:
        done.set()
        for w in watchers:
            w.join(30)
    by_id = dict(zip(ids, images))
    assert len(hits) == 24 and all(not h.caption_error for h in hits)
    assert [h.caption for h in hits] == [reference.caption([by_id[h.id]])[0].text for h in hits]
    assert all(client.get(h.id).caption == h.caption for h in hits)
    assert 2 <= max(decoding) <= 8, decoding
    assert any(0 < n < 24 for n in stored_counts), stored_counts


def test_caption_classify_rank_match_in_process(client, photos, reference, tmp_path):
    got = client.caption(image=photos[2], max_tokens=12)
    want = reference.caption([photos[2]], max_tokens=12)[0]
    assert got.text == want.text and list(got.tokens) == want.tokens
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-4)  # float32 (proto and model)
    labels = ["cat", "rocket", "coffee", "person"]
    classified = client.classify(labels, image=photos[3])
    expected = dict(reference.classify(photos[3], labels))
    assert [l.label for l in classified.labels] == [l for l, _ in reference.classify(photos[3], labels)]
    for entry in classified.labels:
        assert entry.probability == pytest.approx(expected[entry.label], abs=1e-4)
    ranked = client.rank(labels, image=photos[3])
    assert [(t.text, round(t.distance, 4)) for t in ranked.texts] == \
        [(t, round(d, 4)) for t, d in reference.rank(photos[3], labels)]
    video = tmp_path / "clip.mp4"
    write_video(video, [Image.open(io.BytesIO(p)).convert("RGB").resize((64, 64)) for p in photos[:4]])
    got = client.caption(video=video.read_bytes(), frames=4, max_tokens=10)
    assert got.text == reference.caption_video(str(video), frames=4, max_tokens=10).text


def stream_caption(client, **fields) -> list[pb.CaptionChunk]:
    sampling = fields.pop("sampling", {})
    request = pb.CaptionRequest(sampling=pb.SamplingSettings(**sampling), **fields)
    return list(client.stub.CaptionStream(request, timeout=60))


def decoder_stats(triton_url: str) -> dict:
    from serving.client import TritonCoca

    async def ask():
        async with TritonCoca(triton_url) as t:
            return await t.decoder_stats()
    return asyncio.run(ask())


def test_caption_stream_grows_to_the_caption(service, client, photos, reference):
    """CaptionStream: more than one chunk, each text the one before plus its piece, the pieces adding up
    to exactly Caption's text (and the in-process caption), by bytes or by id; a beam search is one
    chunk; the same bounds and errors as Caption (before: no such call)."""
    triton_side_only(service)
    item_id = add(client, photos[2:3])[0].id
    want = client.caption(image=photos[2], max_tokens=12)
    assert want.text == reference.caption([photos[2]], max_tokens=12)[0].text
    for fields in [dict(image=photos[2]), dict(id=item_id)]:
        chunks = stream_caption(client, sampling=dict(max_tokens=12), **fields)
        assert len(chunks) > 1 and [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
        texts = [""] + [c.text for c in chunks]
        assert all(c.text == before + c.piece and c.piece for before, c in zip(texts, chunks[:-1]))
        assert chunks[-1].text == texts[-2] + chunks[-1].piece == "".join(c.piece for c in chunks) == want.text
        counts = [c.token_count for c in chunks]
        assert counts == sorted(set(counts)) and counts[-1] == len(want.tokens)
        assert chunks[-1].caption.text == want.text and list(chunks[-1].caption.tokens) == list(want.tokens)
    beams = stream_caption(client, image=photos[3], sampling=dict(num_beams=3, max_tokens=8))
    assert len(beams) == 1 and beams[0].piece == reference.caption([photos[3]], num_beams=3, max_tokens=8)[0].text

    unary = rpc_error(client.caption, image=photos[0], top_p=2.0)
    assert stream_refused(client, image=photos[0], sampling=dict(top_p=2.0)) == (unary.code(), unary.details())
    assert unary.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in unary.details()
    assert stream_refused(client, image=b"not an image")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert stream_refused(client, video=b"x", frames=65)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert stream_refused(client, id="no-such-item")[0] == grpc.StatusCode.NOT_FOUND


def stream_refused(client, **fields) -> tuple:
    with pytest.raises(grpc.RpcError) as info:
        stream_caption(client, **fields)
    return info.value.code(), info.value.details()


class DecoderFull:
    """Triton's decoder cache held full by beam searches that START and wait (num_beams rows each, 75
    tokens to go): every new caption fails with "decoder cache full" until release() ENDs them."""

    def __init__(self, triton_url: str, image: bytes):
        import tritonclient.grpc as grpcclient

        self.url = triton_url
        self.triton = grpcclient.InferenceServerClient(triton_url)
        embeddings = self.triton.infer("coca_image_encoder", [self._input("IMAGE", np.array([[image]], np.object_))],
                                       outputs=[grpcclient.InferRequestedOutput("IMAGE_EMBEDDINGS")])
        self.embeddings = embeddings.as_numpy("IMAGE_EMBEDDINGS")[:1]
        self.held: list[int] = []

    @staticmethod
    def _input(name: str, array: np.ndarray):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return tensor

    def fill(self) -> "DecoderFull":
        free = decoder_stats(self.url)["free_rows"]
        while free:
            beams = min(16, free)
            sequence = 1_000_000 + len(self.held) + 1
            inputs = [self._input("IMAGE_EMBEDDINGS", self.embeddings),
                      *(self._input(name, np.array([[value]], np.int32))
                        for name, value in (("NUM_BEAMS", beams), ("MIN_TOKENS", 75), ("MAX_TOKENS", 75)))]
            self.triton.infer("coca_text_decoder", inputs, sequence_id=sequence, sequence_start=True)
            self.held.append(sequence)
            free -= beams
        assert decoder_stats(self.url)["free_rows"] == 0
        return self

    def release(self) -> None:
        while self.held:
            self.triton.infer("coca_text_decoder", [], sequence_id=self.held.pop(), sequence_end=True)


def test_a_cancelled_stream_frees_its_slot_and_failed_ingest_captions_are_retried(tmp_path, triton, photos,
                                                                                      reference):
    """One service with small bounds for two things (one process start: CI time).
    1. A stream holds a Caption slot (--max-inflight-caption 1) until it ends; a cancelled one frees it and
       ends its decoder sequence at once.
    2. AddOptions.caption while Triton's decoder is full: the items are stored, their captions fail, and
       Stats counts them pending; once the decoder has room the retry job captions them, each equal to
       what Caption answers for the item and to the in-process caption (before: they stayed uncaptioned).
    (That the book survives a restart: tests/test_search_store.py, the job over a reopened store.)"""
    images = noisy_variants(photos[:3], 3)
    full = DecoderFull(triton.grpc_url, images[0])
    flags = ("--max-inflight-caption", "1", "--max-queue-wait", "0", "--caption-retry-wait", "0.3")  # refused at once
    try:
        with ServiceProcess(tmp_path, triton.grpc_url, *flags) as service, \
                WireClient(service.address, timeout=60) as client:
            add(client, images[2:3])  # binds the store, so the decoder is the only thing failing below
            # (the session's Triton: an earlier test's cut sequence may live until its idle expiry)
            live_before = decoder_stats(triton.grpc_url)["live_sequences"]
            long = pb.SamplingSettings(min_tokens=75, max_tokens=75)  # ~75 steps: far longer than what follows
            held = client.stub.CaptionStream(pb.CaptionRequest(image=photos[0], sampling=long), timeout=60)
            assert not next(held).done
            assert stream_refused(client, image=photos[1])[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.cancel()
            chunks = wait_for(lambda: stream_caption(client, image=photos[1], sampling=dict(max_tokens=4)), 10,
                              "the cancelled stream's slot")
            assert chunks[-1].done
            wait_for(lambda: decoder_stats(triton.grpc_url)["live_sequences"] <= live_before, 10,
                     "the decoder sequence to end")

            full.fill()
            results = list(client.add_images(pb.AddImageRequest(image=data, options=pb.AddOptions(caption=True))
                                             for data in images[:2]))
            assert [r.outcome for r in results] == [ADDED, ADDED]
            assert all("decoder cache full" in r.caption_error and not r.caption for r in results)
            stats = client.stats()
            assert (stats.captions_pending_retry, stats.captions_retried_ok, stats.captions_given_up) == (2, 0, 0)
            full.release()
            wait_for(lambda: client.stats().captions_pending_retry == 0, 30, "the retries")
            stats = client.stats()
            assert (stats.captions_retried_ok, stats.captions_given_up) == (2, 0)
            for result, data in zip(results, images):
                stored = client.get(result.id).caption
                assert stored and stored == client.caption(id=result.id).text == reference.caption([data])[0].text
    finally:
        full.release()


def write_video(path: Path, frames: list[Image.Image]) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_health_and_reflection(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(service.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        serving = wait_for(lambda: check(health_pb2.HealthCheckRequest(service="coca.search.v1.SearchService")).status
                           == health_pb2.HealthCheckResponse.SERVING, 10, "SERVING")
        assert serving
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"coca.search.v1.SearchService", "grpc.health.v1.Health"} <= names


def test_restart_and_sigkill_lose_nothing(tmp_path, triton, photos):
    """A clean restart keeps everything; kill -9 in the middle of an AddImages stream loses no
    acknowledged item, and after either the index holds exactly the store's items."""
    with ServiceProcess(tmp_path, triton.grpc_url) as service, WireClient(service.address) as client:
        ids = [r.id for r in add(client, photos[:4], metadata={"k": "v"})]
        captioned = client.search_text("a rocket", k=2, with_captions=True).hits
        before = [(h.id, round(h.score, 5), h.caption) for h in client.search_text("a rocket", k=4).hits]
        client.delete(ids[3])
    service = ServiceProcess(tmp_path, triton.grpc_url).start()
    acked = []
    try:
        with WireClient(service.address) as client:
            stats = client.stats()
            assert stats.count == stats.indexed == 3 and stats.snapshot_sequence == stats.last_sequence
            after = [(h.id, round(h.score, 5), h.caption) for h in client.search_text("a rocket", k=4).hits]
            assert after == [b for b in before if b[0] != ids[3]]
            assert all(client.get(h.id).caption == h.caption for h in captioned if h.id != ids[3])
            assert client.get(ids[0]).metadata == {"k": "v"}
            assert "index: snapshot at seq" in service.output()  # loaded, not rebuilt
            stream = client.add_images(pb.AddImageRequest(image=v) for v in noisy_variants(photos, 200))
            with pytest.raises(grpc.RpcError):
                for result in stream:
                    assert result.outcome == ADDED
                    acked.append(result.id)
                    if len(acked) == 40:
                        os.kill(service.proc.pid, signal.SIGKILL)
    finally:
        service.kill()
    assert len(acked) >= 40
    with ServiceProcess(tmp_path, triton.grpc_url) as service, WireClient(service.address) as client:
        stats = client.stats()
        assert stats.count == stats.indexed and stats.count >= 3 + len(acked)
        for item_id in acked[::7]:
            assert client.search_image(id=item_id, k=1).hits[0].id == item_id  # in the index, not only the store
        assert all(client.get(i).id == i for i in acked)


NOISE_SEEDS = itertools.count()


def noisy_variants(photos: list[bytes], count: int) -> list[bytes]:
    """`count` distinct small JPEGs: the photos with pixel noise, new noise on every call (tests share one
    service: two tests must not add the same bytes by chance)."""
    rng = np.random.default_rng(next(NOISE_SEEDS))
    base = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB").resize((96, 96)), np.int16) for p in photos]
    return [jpeg(Image.fromarray(np.clip(base[i % len(base)] + rng.integers(-8, 8, (96, 96, 3)), 0, 255)
                                 .astype(np.uint8))) for i in range(count)]


@pytest.mark.long  # two Triton restarts (~2 min); make test keeps tests/reliability/test_triton_faults.py's short run
def test_triton_down_gives_unavailable_then_recovers(service, client, triton, photos):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    triton_side_only(service)

    fresh = noisy_variants(photos[1:2], 2)
    with grpc.insecure_channel(service.address) as channel:
        item = add(client, fresh[:1])[0]
        triton.stop()
        try:
            error = rpc_error(client.search_text, "a cat nobody searched before")  # not cached
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in error.details()
            assert triton.grpc_url in error.details()
            error = rpc_error(lambda: list(client.add_images([pb.AddImageRequest(image=fresh[1])])))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in error.details()
            assert client.get(item.id).id == item.id  # the store still answers
            assert client.search_image(id=item.id, k=1).hits[0].id == item.id
            check = health_pb2_grpc.HealthStub(channel).Check
            wait_for(lambda: check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING,
                     10, "NOT_SERVING")
        finally:
            triton.start()
        hits = wait_for(lambda: client.search_image(fresh[0], k=1).hits, 30, "search to work again")
        assert hits[0].id == item.id
        assert add(client, fresh[1:])[0].outcome == ADDED
        wait_for(lambda: check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING,
                 10, "SERVING")


def test_path_errors_name_the_path_as_the_client_gave_it(tmp_path, triton, photos):
    """Unreadable images and server-side paths are explained without the server's own paths (before:
    the OS error's text, e.g. "No such file or directory: '/srv/data/blobs/..'", reached the client)."""
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    gone, changed, blob = noisy_variants(photos[9:12], 3)
    (root / "gone.jpg").write_bytes(gone)
    (root / "changed.jpg").write_bytes(changed)
    with ServiceProcess(data, triton.grpc_url, "--root", str(root)) as service, WireClient(service.address) as client:
        results = list(client.add_images([pb.AddImageRequest(path="gone.jpg", metadata={"set": "paths"}),
                                          pb.AddImageRequest(path="changed.jpg", metadata={"set": "paths"}),
                                          pb.AddImageRequest(image=blob, metadata={"set": "paths"})]))
        assert [r.outcome for r in results] == [ADDED] * 3
        (root / "gone.jpg").unlink()
        (root / "changed.jpg").write_bytes(blob)
        next(data.glob(f"blobs/*/{results[2].content_sha256}")).unlink()
        messages = []
        for result, reason in zip(results, ["cannot be read (No such file or directory)", "changed since it was indexed",
                                            "cannot be read (No such file or directory)"]):
            error = rpc_error(client.get, result.id, include_image=True)
            assert error.code() == grpc.StatusCode.NOT_FOUND and reason in error.details(), error.details()
            messages.append(error.details())
        hits = client.search_text("a photo", k=3, with_captions=True, filters={"set": "paths"}).hits
        assert len(hits) == 3 and all(f"the image of item {h.id!r}" in h.caption_error for h in hits)
        messages += [h.caption_error for h in hits]
        again = list(client.add_images([pb.AddImageRequest(path="gone.jpg"), pb.AddImageRequest(path="nested/../x.jpg"),
                                        pb.AddImageRequest(path="q" * 5000)]))
        assert "'gone.jpg': no such file" in again[0].error.message and again[2].error.message.endswith("...: not a usable path (File name too long)")
        messages += [r.error.message for r in again]
        if os.geteuid() != 0:  # root reads any file: an unreadable one cannot be made
            (root / "locked.jpg").write_bytes(gone)
            (root / "locked.jpg").chmod(0)
            locked = list(client.add_images([pb.AddImageRequest(path="locked.jpg")]))[0]
            assert locked.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert "'locked.jpg': cannot read it (Permission denied)" in locked.error.message
            messages.append(locked.error.message)
    for message in messages:
        assert str(tmp_path) not in message and str(tmp_path.resolve()) not in message, message


def test_health_asks_triton_and_other_weights_are_refused(tmp_path, triton, photos):
    """Health and Stats ask Triton each time (before: its first answer was cached for good, so health
    said SERVING while Triton was down); a Triton at the same address with other weights of the same model
    and dimension (coca-tiny, seed 1) is refused with FAILED_PRECONDITION and nothing is written (before:
    its embeddings were added to the store built with seed 0). A relay in front of the session's Triton
    plays the server's death and its replacement, as the service sees them."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.repository import ensure_repository
    from serving.testing import TcpRelay, running_triton

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    other_repository, _ = ensure_repository(tmp_path / "seed1" / "repo", MODEL, PRETRAINED, seed=1)
    fresh = noisy_variants(photos[2:3], 3)
    with running_triton(other_repository) as (other_url, _, _), TcpRelay(triton.grpc_url) as relay, \
            ServiceProcess(tmp_path / "data", relay.url) as service, WireClient(service.address) as client, \
            grpc.insecure_channel(service.address) as channel:
        check = lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert add(client, fresh[:1])[0].outcome == ADDED
        assert wait_for(lambda: check() == serving, 10, "SERVING") and client.stats().triton_ready
        relay.cut()  # Triton gone; nothing else calls it: the probe itself must find out
        started = time.monotonic()  # Checks share one answer for HEALTH_CHECK_TTL_S (1 s): the next one after it asks
        assert wait_for(lambda: check() == not_serving, 5, "NOT_SERVING") and not client.stats().triton_ready
        assert time.monotonic() - started < 5
        relay.point_to(other_url)  # same address, same model and dimension, other weights
        before = client.stats().count
        for call in (lambda: add(client, fresh[1:2]), lambda: client.search_text("a cat"),
                     lambda: client.caption(image=fresh[1])):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (error.code(), error.details())
            assert "weights" in error.details() and "serve those weights again" in error.details()
        assert check() == not_serving and not client.stats().triton_ready
        assert client.stats().count == before  # nothing of the other weights reached the store
        relay.point_to(triton.grpc_url)
        assert wait_for(lambda: check() == serving, 30, "SERVING again") and client.stats().triton_ready
        assert add(client, fresh[1:2])[0].outcome == ADDED
        assert client.search_image(fresh[1], k=1).hits[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_token_tls_and_message_limit(tmp_path, triton, photos):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token), "--max-message-mb", "1"]
    with ServiceProcess(tmp_path / "data", triton.grpc_url, *args) as service:
        with WireClient(service.address, tls_ca=cert) as anonymous:
            error = rpc_error(anonymous.stats)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in error.details()
        with WireClient(service.address, token="wrong", tls_ca=cert) as wrong:
            assert rpc_error(wrong.stats).code() == grpc.StatusCode.UNAUTHENTICATED
        with WireClient(service.address, token="s3cret", tls_ca=cert) as client:
            assert add(client, photos[:1])[0].outcome == ADDED
            big = rpc_error(lambda: list(client.add_images([pb.AddImageRequest(image=os.urandom(2 << 20))])))
            assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with WireClient(service.address, token="s3cret") as plaintext:  # TLS only
            assert rpc_error(plaintext.stats).code() == grpc.StatusCode.UNAVAILABLE


def test_cli_index_resume_search_html(tmp_path, service, photos, capsys):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    for i, data in enumerate(photos[:5]):  # re-encoded: content the shared service has not seen
        image = Image.open(io.BytesIO(data)).convert("RGB")
        (folder / ("sub" if i % 2 else "") / f"p{i}.jpg").write_bytes(jpeg(image, quality=70))
    (folder / "broken.png").write_bytes(b"not a png")

    def run(*args):  # the CLI's main() in this process (a new interpreter would spend seconds importing torch)
        from clients.cli import main

        capsys.readouterr()
        code = main([*args, "--server", service.address])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    first = run("index", str(folder), "--meta", "album=cli")
    assert first.returncode == 1 and "6 files:" in first.stdout and "1 failed" in first.stdout
    assert "broken.png" in first.stderr and "not an image" in first.stderr
    second = run("index", str(folder), "--meta", "album=cli")  # resumable: nothing is embedded again
    assert "0 added, 5 already indexed, 1 failed" in second.stdout
    page = tmp_path / "out.html"
    found = run("search", "a photo of a cat", "-k", "3", "--captions", "--filter", "album=cli", "--html", str(page))
    assert found.returncode == 0, found.stderr
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 3 and "score" in html
    by_image = run("search", "--image", str(folder / "p0.jpg"), "-k", "1", "--filter", "album=cli")
    assert by_image.returncode == 0 and str(folder / "p0.jpg") in by_image.stdout


@pytest.fixture(scope="module", autouse=True)
def background_serve(tmp_path_factory, repository):
    """`coca serve` (its own Triton + service) started early, so its start overlaps the other tests;
    the last test checks it."""
    from serving.repository import MARKER

    data = tmp_path_factory.mktemp("serve")
    repo, _ = repository  # reuse the export: serve finds it and its marker
    shutil.copytree(repo, data / "model_repository")
    shutil.copy(repo.parent / f"{repo.name}.{MARKER}", data / f"model_repository.{MARKER}")
    log = data / "serve.log"
    with open(log, "w") as out:  # port 0: it binds what the kernel gives and says where in its ready line
        proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--model", MODEL, "--pretrained",
                                 PRETRAINED, "--data", str(data), "--port", "0",
                                 "--encoders", "torch", "--decoder-scheduler", "sequence"], cwd=ROOT,  # the export's
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    yield proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_coca_serve_starts_and_stops_both(background_serve):
    from search_service.process import READY

    proc, log = background_serve
    wait_for(lambda: "search service ready" in log.read_text() or proc.poll() is not None, 120, "coca serve")
    assert proc.poll() is None, log.read_text()
    assert "exporting" not in log.read_text()
    ready = READY.search(log.read_text())
    with WireClient(f"{ready.group(1)}:{ready.group(2)}") as client:
        assert wait_for(lambda: client.stats().triton_ready, 20, "Triton ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()
    out = log.read_text()
    assert "search service stopped" in out and "stopping tritonserver" in out


def test_delete_on_a_trained_ivf_index_keeps_the_service_up_and_answers_right(tmp_path, triton):
    """The issue's reproduction: IVF trained inside the service, then Delete. It used to abort the process on a
    FAISS assertion (IndexIDMap2 over IVF); now every search afterwards equals exact search over the live items."""
    rng = np.random.default_rng(11)
    images = [jpeg(Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))) for _ in range(90)]
    with ServiceProcess(tmp_path, triton.grpc_url, "--index", "IVF2,Flat", "--nprobe", "2") as process, \
            WireClient(process.address, timeout=60) as client:
        ids = [r.id for r in add(client, images)]
        assert len(set(ids)) == 90
        wait_for(lambda: client.stats().index_active == "IVF2,Flat", 60, "the trained IVF index")
        for gone in ids[:5]:
            assert client.delete(gone).id == gone
        live = ids[5:]
        vectors = np.array([list(client.get(i, include_embedding=True).embedding) for i in live], np.float32)
        for row, item_id in enumerate(live[:15]):
            hits = client.search_image(id=item_id, k=5).hits
            exact = vectors @ vectors[row]
            order = np.argsort(-exact)[:5]
            assert [h.id for h in hits] == [live[i] for i in order]
            assert np.allclose([h.score for h in hits], exact[order], atol=1e-5)
        stats = client.stats()
        assert stats.count == stats.indexed == 85 and process.proc.poll() is None


def test_a_long_failure_message_is_cut_to_fit_the_status():
    """A handler's error quoting its input (image bytes in a ValueError, seen in CaptionStream after a merge)
    made status details over gRPC's 16 KiB metadata limit: the client saw RESOURCE_EXHAUSTED "metadata size
    exceeds hard limit" instead of the error. The message is cut, the code kept."""
    from search_service.service import MAX_DETAILS_CHARS, status_of

    code, message = status_of(ValueError("could not convert " + repr(os.urandom(100_000))))
    assert code == grpc.StatusCode.INTERNAL and message.startswith("internal error: ValueError: could not convert")
    assert MAX_DETAILS_CHARS <= len(message) < MAX_DETAILS_CHARS + 100 and "more characters" in message
    assert status_of(ValueError("short"))[1] == "internal error: ValueError: short"
