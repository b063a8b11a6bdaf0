"""Pages are slices of one ranking, in every mode and store: checked against a brute-force ranking.

The ranking of a query is its hits in one order: score descending, ties by item id (in a field order: the field,
then insertion). While the collection is unchanged, the pages of a query (page tokens, as the service makes
them) must concatenate to that ranking exactly: each hit once, in order, none lost at a tie. While it changes, no
hit may show twice, and no item live throughout that ranks above the last hit shown may be skipped.

The collections are made of ties: groups of items with one embedding (the same picture saved several ways),
identical titles and captions, and embeddings of small dyadic coordinates, so every score is exact in float32
and float64 alike and distinct embeddings tie too. The oracle computes scores, BM25 and the fusion itself.

* `SearchQuery` (the one value a request becomes) drives the real Engine (SQLite + FAISS Flat / IVF) without
  gRPC: random collections, modes (vector, keyword, hybrid), k, orders, min_score and filters;
* the same on the real Milvus (vector mode: Milvus 2.3 has no keyword index);
* the issue's scenario end to end through the real gRPC service and Triton: 10 pictures saved 4 ways.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search_service.engine import Engine
from search_service.hybrid import RRF_K
from search_service.index import IndexSettings
from search_service.options import HYBRID, KEYWORD, VECTOR, SearchQuery
from search_service.query import Condition, Filter, Order, Schema
from search_service.store import NewItem, default_id, sha256_hex
from tests.test_search_store import bm25_oracle

DIM = 4
SCHEMA = Schema({"title": "text", "n": "number"})
TITLES = ["red dog", "red dog ball", "blue cat", "blue cat ball", ""]
CAPTIONS = [None, "a red dog", "a cat on a ball"]
TEXTS = ["red dog ball", "cat", "blue ball", "dog", "zebra"]
INDEXES = {"Flat": {}, "IVF4,Flat": {"nprobe": 4, "train_per_centroid": 2}}  # nprobe == nlist: exact
EXAMPLES = {"short": 20, "long": 400}  # collections; each is paged by 1-4 queries

coordinates = st.lists(st.integers(-2, 2), min_size=DIM, max_size=DIM).filter(any)
item_specs = st.tuples(st.integers(0, 5), st.integers(0, len(TITLES) - 1), st.integers(0, len(CAPTIONS) - 1),
                       st.sampled_from(["a", "b", None]), st.sampled_from(["1", "2", "3", None]))
collections_ = st.fixed_dictionaries({
    "groups": st.lists(coordinates, min_size=1, max_size=5),  # distinct pictures; items copy one
    "items": st.lists(item_specs, min_size=15, max_size=40)})
queries = st.fixed_dictionaries({
    "mode": st.sampled_from([VECTOR, KEYWORD, HYBRID]), "k": st.integers(1, 7), "vector": coordinates,
    "text": st.sampled_from(TEXTS), "colour": st.sampled_from([None, "a", "b"]),
    "min_score": st.sampled_from([None, None, -0.25, 0.0, 0.25]),  # exact scores: multiples of 1/16 hit them
    "order": st.sampled_from([None, None, ("n", False), ("n", True)]),
    "weight": st.sampled_from([0.5, 0.3, 1.0]), "fusion_depth": st.sampled_from([100, 3, 8])})


@pytest.fixture(scope="module")
def figures():
    """What the oracle checked (cases, modes, tied hits), printed at the end of the module."""

    class Figures(dict):
        def record(self, section: str, **values) -> None:
            self[section] = values

    shown = Figures()
    yield shown
    for section, values in shown.items():
        print(f"{section}: {values}", file=sys.__stderr__)


# ---------------------------------------------------------------- the oracle
@dataclasses.dataclass
class Known:
    id: str
    embedding: np.ndarray
    metadata: dict
    caption: str | None
    seq: int  # insertion order: ties of a field order


def dyadic(values) -> np.ndarray:
    return np.asarray(values, np.float32) / 4  # sums of products of these are exact in float32


def passing(known: list[Known], colour) -> list[Known]:
    return [i for i in known if colour is None or i.metadata.get("colour") == colour]


def vector_ranking(known: list[Known], query: np.ndarray, colour, min_score) -> list[tuple[str, float]]:
    scored = [(i.id, float(i.embedding.astype(np.float64) @ query)) for i in passing(known, colour)]
    return sorted([p for p in scored if min_score is None or p[1] >= min_score], key=lambda p: (-p[1], p[0]))


def field_ranking(known: list[Known], query: np.ndarray, colour, min_score, order) -> list[str]:
    field, descending = order
    hits = {i for i, _ in vector_ranking(known, query, colour, min_score)}

    def position(item: Known):
        value = item.metadata.get(field)
        return value is None, 0.0 if value is None else (-float(value) if descending else float(value)), item.seq

    return [i.id for i in sorted(passing(known, colour), key=position) if i.id in hits]


def keyword_ranking(known: list[Known], text: str, colour) -> list[tuple[str, float]]:
    """BM25 over every item's caption and title (the collection's statistics), kept for the passing items."""
    documents = {i.id: " ".join([i.caption or "", i.metadata.get("title", "")]) for i in known}
    scores = bm25_oracle(text, documents)
    ids = {i.id for i in passing(known, colour)}
    # 12 significant digits: equal documents score equal here and there, computed in other orders
    return sorted(((i, s) for i, s in scores.items() if i in ids), key=lambda p: (-float(f"{p[1]:.12g}"), p[0]))


def hybrid_ranking(known, query, text, colour, weight, depth) -> list[str]:
    fused: dict[str, float] = {}
    for rank, (i, _) in enumerate(vector_ranking(known, query, colour, None)[:depth], 1):
        fused[i] = (1 - weight) / (RRF_K + rank)
    for rank, (i, _) in enumerate(keyword_ranking(known, text, colour)[:depth], 1):
        fused[i] = fused.get(i, 0.0) + weight / (RRF_K + rank)
    return [i for i, _ in sorted(fused.items(), key=lambda p: (-p[1], p[0]))]


def expected_ids(known: list[Known], q: dict) -> list[str]:
    vector = dyadic(q["vector"]).astype(np.float64)
    if q["mode"] == KEYWORD:
        return [i for i, _ in keyword_ranking(known, q["text"], q["colour"])]
    if q["mode"] == HYBRID:
        return hybrid_ranking(known, vector, q["text"], q["colour"], q["weight"], max(q["fusion_depth"], q["k"] + 1))
    if q["order"] is not None:
        return field_ranking(known, vector, q["colour"], q["min_score"], q["order"])
    return [i for i, _ in vector_ranking(known, vector, q["colour"], q["min_score"])]


# ---------------------------------------------------------------- paging through the query value
def query_value(q: dict, token: str = "") -> SearchQuery:
    word_mode = q["mode"] != VECTOR
    return SearchQuery.build(
        q["mode"], q["k"], ["test", q["mode"], q["text"], q["weight"]], token,
        filters=Filter((Condition("colour", (q["colour"],)),)) if q["colour"] else None,
        min_score=None if word_mode else q["min_score"],
        order=Order(*q["order"]) if q["order"] and not word_mode else None,
        keyword_weight=q["weight"], fusion_depth=q["fusion_depth"], vector=dyadic(q["vector"]), text=q["text"])


def all_pages(collection, q: dict, between=None, limit: int = 200) -> list:
    """Every page of the query, following next page tokens; `between()` runs between pages."""
    hits, token = [], ""
    for _ in range(limit):
        page, token = query_value(q, token).page(collection)
        assert page or not hits, "a page token led to an empty page"
        assert len(page) <= q["k"]
        hits.extend(page)
        if not token:
            return hits
        if between is not None:
            between()
    raise AssertionError(f"more than {limit} pages")


def check_pages(collection, known: list[Known], q: dict) -> int:
    hits = all_pages(collection, q)
    expected = expected_ids(known, q)
    assert [h.item.id for h in hits] == expected, (q, [h.item.id for h in hits], expected)
    scores = [h.score for h in hits]
    return sum(scores.count(s) > 1 for s in scores)  # hits sharing their score with another hit


# ---------------------------------------------------------------- the embedded store (no gRPC)
def fill(collection, spec: dict, seed: int = 0) -> list[Known]:
    """Items copying the spec's group embeddings (distinct bytes each: other files of one picture)."""
    groups = [dyadic(g) for g in spec["groups"]]
    known, items = [], []
    for n, (group, title, caption, colour, number) in enumerate(spec["items"]):
        metadata = {key: value for key, value in [("title", TITLES[title]), ("colour", colour), ("n", number)]
                    if value}
        data = f"picture {seed} {n}".encode()
        items.append(NewItem(sha256_hex(data), f"mem:{n}", groups[group % len(groups)], metadata=metadata, data=data))
        known.append(Known(default_id(sha256_hex(data)), items[-1].embedding, metadata, CAPTIONS[caption], n))
    collection.add(items)
    captions = {i.id: i.caption for i in known if i.caption}
    if captions:
        collection.set_captions(captions)
    return known


class Counts:
    def __init__(self):
        self.cases = self.pages_hits = self.ties = 0
        self.modes: dict[str, int] = {}


def engine_case(factory: str, spec: dict, qs: list[dict], counts: Counts) -> None:
    folder = Path(tempfile.mkdtemp(prefix="coca-paging-"))
    engine = Engine(folder, IndexSettings(factory=factory, **INDEXES[factory]), schema=SCHEMA)
    try:
        engine.bind_model("test", "random", DIM)
        engine.open_index(DIM)
        known = fill(engine, spec)
        for q in qs:
            counts.ties += check_pages(engine, known, q)
            counts.cases += 1
            counts.modes[q["mode"]] = counts.modes.get(q["mode"], 0) + 1
    finally:
        engine.close()
        shutil.rmtree(folder, ignore_errors=True)


def run_engine_oracle(factory: str, examples: int, figures) -> None:
    counts = Counts()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(spec=collections_, qs=st.lists(queries, min_size=1, max_size=4))
    def pages_are_the_ranking(spec, qs):
        engine_case(factory, spec, qs, counts)

    pages_are_the_ranking()
    figures.record(f"paging oracle {factory}", cases=counts.cases, modes=counts.modes, tied_hits=counts.ties)
    assert counts.ties and len(counts.modes) == 3


@pytest.mark.parametrize("factory", list(INDEXES))
def test_pages_are_the_ranking_on_the_embedded_store(factory, figures):
    run_engine_oracle(factory, EXAMPLES["short"], figures)


@pytest.mark.long
@pytest.mark.untimed
@pytest.mark.parametrize("factory", list(INDEXES))
def test_pages_are_the_ranking_on_the_embedded_store_long(factory, figures):
    run_engine_oracle(factory, EXAMPLES["long"], figures)


def test_the_issues_hybrid_pages_show_the_best_fused_hit(tmp_path):
    """Issue 19: with k=1, vector list [A, B, E, ...] and keyword list [C, D, B, ...], B (found by both lists
    only at depth 3) is the best fused hit; pages that re-searched `depth + k + 1` deep never showed it."""
    engine = Engine(tmp_path, IndexSettings(), schema=SCHEMA)
    engine.bind_model("test", "random", DIM)
    engine.open_index(DIM)
    vectors = {"A": [4, 0, 0, 0], "B": [3, 1, 0, 0], "E": [2, 2, 0, 0], "F": [1, 2, 1, 0], "C": [0, 0, 0, 4],
               "D": [0, 0, 1, 4], "G": [0, 1, 2, 2], "H": [0, 0, 4, 1], "I": [-2, 0, 0, 2]}
    titles = {"C": "ball ball ball", "D": "ball ball ball cat", "B": "ball ball ball cat dog"}
    items = [NewItem(sha256_hex(name.encode()), name, dyadic(v) / np.linalg.norm(v), id=name,
                     metadata={"title": titles.get(name, "zebra")}, data=name.encode()) for name, v in vectors.items()]
    engine.add(items)
    q = {"mode": HYBRID, "k": 1, "vector": [4, 0, 0, 0], "text": "ball", "colour": None, "min_score": None,
         "order": None, "weight": 0.5, "fusion_depth": 100}
    known = [Known(i.id, i.embedding, i.metadata, None, n) for n, i in enumerate(items)]
    assert [i for i, _ in vector_ranking(known, dyadic(q["vector"]).astype(np.float64), None, None)][:3] == ["A", "B", "E"]
    assert [i for i, _ in keyword_ranking(known, "ball", None)] == ["C", "D", "B"]
    shown = [h.item.id for h in all_pages(engine, q)]
    assert shown == expected_ids(known, q) and shown[0] == "B"
    engine.close()


def test_pages_while_the_collection_changes(tmp_path):
    """Between pages, items are added and deleted: no hit shows twice, and every item live throughout that ranks
    above the last hit shown was shown (vector mode; its scores do not depend on the rest of the collection)."""
    rng = np.random.default_rng(7)
    engine = Engine(tmp_path, IndexSettings(), schema=SCHEMA)
    engine.bind_model("test", "random", DIM)
    engine.open_index(DIM)
    groups = [rng.integers(-2, 3, DIM) for _ in range(5)]
    serial = iter(range(10 ** 6))

    def add(count: int) -> None:
        items = []
        for _ in range(count):
            data = f"changing {next(serial)}".encode()
            items.append(NewItem(sha256_hex(data), "mem:", dyadic(groups[rng.integers(len(groups))]), data=data))
        engine.add(items)

    add(60)
    for k in (1, 2, 3, 5):
        query = dyadic(rng.integers(-2, 3, DIM))
        before = {h.item.id for h in engine.search(query, 1000)}
        deleted: set[str] = set()

        def change():
            add(int(rng.integers(0, 4)))
            live = sorted(h.item.id for h in engine.search(query, 1000))
            for victim in rng.choice(live, size=min(2, len(live)), replace=False):
                deleted.add(str(victim))
                engine.delete(str(victim))

        q = {"mode": VECTOR, "k": k, "vector": None, "text": "", "colour": None, "min_score": None, "order": None,
             "weight": 0.5, "fusion_depth": 100}
        hits, token = [], ""
        for _ in range(500):
            page, token = dataclasses.replace(query_value({**q, "vector": [0] * DIM}, token), vector=query).page(engine)
            hits.extend(page)
            if not token:
                break
            change()
        ids = [h.item.id for h in hits]
        assert len(ids) == len(set(ids)), "a hit shown twice"
        last = (-hits[-1].score, hits[-1].item.id)
        scores = {h.item.id: h.score for h in engine.search(query, 1000)}
        throughout = (before - deleted) & set(scores)
        skipped = [i for i in throughout if (-scores[i], i) < last and i not in ids]
        assert not skipped, f"k={k}: items live throughout and ranked above the last hit shown were skipped: {skipped}"
    engine.close()


# ---------------------------------------------------------------- the real Milvus (vector mode)
@pytest.mark.parametrize("examples", [pytest.param(40, id="short"), pytest.param(400, id="long", marks=[pytest.mark.long, pytest.mark.untimed])])
def test_pages_are_the_ranking_on_milvus(examples, milvus_server, tmp_path, figures):
    from search_service.milvus import MilvusCollection, MilvusSettings

    rng = np.random.default_rng(3)
    collection = MilvusCollection(tmp_path, MilvusSettings(uri=milvus_server.uri, collection=f"paging_{time.time_ns()}"))
    collection.bind_model("test", "random", DIM)
    collection.open_index(DIM)
    try:  # one collection of ties (Milvus takes a while to make one); the queries vary
        spec = {"groups": [list(rng.integers(-2, 3, DIM)) for _ in range(6)],
                "items": [(int(rng.integers(6)), 0, 0, str(rng.choice(["a", "b"])), None) for _ in range(45)]}
        spec["groups"] = [g if any(g) else [1, 0, 0, 0] for g in spec["groups"]]
        known = fill(collection, spec)
        counts = Counts()

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(q=queries)
        def pages_are_the_ranking(q):
            q = {**q, "mode": VECTOR, "order": None}
            counts.ties += check_pages(collection, known, q)
            counts.cases += 1

        pages_are_the_ranking()
        figures.record("paging oracle milvus", cases=counts.cases, modes={VECTOR: counts.cases}, tied_hits=counts.ties)
        assert counts.ties
    finally:
        collection.drop_all()
        collection.close()


def test_milvus_pages_read_rows_and_captions_of_their_own_hits_only(milvus_server, tmp_path):
    """A page at depth d ranks d + k + 1 hits: the ranking reads ids only, and item rows and captions are read
    for the k hits the page shows (they were read for all d + k + 1, captions by a `pk in [...]` expression that
    long: O(depth^2) over a query's pages). The pages are the ranking, each hit with its own stored item."""
    from search_service.milvus import MilvusCollection, MilvusSettings

    collection = MilvusCollection(tmp_path, MilvusSettings(uri=milvus_server.uri, collection=f"rows_{time.time_ns()}"))
    collection.bind_model("test", "random", DIM)
    collection.open_index(DIM)
    try:
        spec = {"groups": [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]],
                "items": [(n % 3, 0, n % 3, None, None) for n in range(40)]}
        known = {i.id: i for i in fill(collection, spec)}
        client, reads = collection.client, []

        def counting(name: str):
            method = getattr(client, name)

            def call(target, **kwargs):
                found = method(target, **kwargs)
                rows = found[0] if name == "search" else found
                if target == collection.captions_name or "uri" in kwargs["output_fields"]:
                    reads.append((target, len(rows)))  # whole item rows, or caption rows
                return found
            return call

        client.search, client.query = counting("search"), counting("query")
        k, q = 3, {"mode": VECTOR, "k": 3, "vector": [2, 1, 0, 0], "text": "", "colour": None, "min_score": None,
                   "order": None, "weight": 0.5, "fusion_depth": 100}
        shown, token = [], ""
        for _ in range(20):
            reads.clear()
            hits, token = query_value(q, token).page(collection)
            assert all(rows <= k for _, rows in reads) and len(reads) <= 2, (len(shown), reads)
            assert [(h.item.caption, h.item.uri) for h in hits] == [
                (known[h.item.id].caption, f"mem:{known[h.item.id].seq}") for h in hits]
            shown += [h.item.id for h in hits]
            if not token:
                break
        assert shown == expected_ids(list(known.values()), q)
    finally:
        collection.drop_all()
        collection.close()


# ---------------------------------------------------------------- end to end: the real gRPC service and Triton
def ten_pictures_four_ways() -> tuple[list[bytes], list[str]]:
    """Issue 19's collection: 10 pictures, each saved as PNG, BMP, TIFF and lossless WebP (identical pixels: one
    embedding each group), titled "red dog" / "blue cat", " ball" on half."""
    from PIL import Image

    rng = np.random.default_rng(19)
    files, titles = [], []
    for n in range(10):
        picture = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        for fmt, options in [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]:
            out = io.BytesIO()
            picture.save(out, format=fmt, **options)
            files.append(out.getvalue())
            titles.append(("red dog" if n % 2 else "blue cat") + (" ball" if n % 4 < 2 else ""))
    return files, titles


@pytest.fixture(scope="module")
def triton(plain_triton):
    return plain_triton


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def issue_service(request, tmp_path_factory, triton):
    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess, WireClient

    store = ()
    if request.param == "milvus":
        server = request.getfixturevalue("milvus_server")
        store = ("--vector-store", "milvus", "--milvus-uri", server.uri, "--collection", f"paging_{time.time_ns()}")
    with ServiceProcess(tmp_path_factory.mktemp("data"), triton.grpc_url, "--field", "title:text", *store) as service, \
            WireClient(service.address, timeout=60) as client:
        files, titles = ten_pictures_four_ways()
        results = list(client.add_images(pb.AddImageRequest(image=data, metadata={"title": title})
                                         for data, title in zip(files, titles)))
        assert [r.outcome for r in results] == [pb.AddImageResult.ADDED] * 40
        yield request.param, client, [r.id for r in results], titles


def grpc_pages(call, k: int) -> list:
    hits, token = [], ""
    for _ in range(100):
        response = call(k, token)
        assert response.hits or not hits
        hits.extend(response.hits)
        token = response.next_page_token
        if not token:
            return hits
    raise AssertionError("more than 100 pages")


def test_the_issues_collection_pages_through_grpc(issue_service):
    """The issue's scenario through the service: search_image by id (k=3, 5) pages through all 40 items, each
    once, in the exact ranking (scores from the stored embeddings; equal embeddings tie, ties by id); keyword
    and hybrid pages (k=1, 3) are the brute-force BM25 ranking and its fusion with the vector ranking."""
    from search_service.pb import search_pb2 as pb

    store, client, ids, titles = issue_service
    embeddings = {i: np.array(client.get(i, include_embedding=True).embedding, np.float32) for i in ids}
    assert len({v.tobytes() for v in embeddings.values()}) <= 10 * 2  # groups of equal embeddings (ties)

    probe = ids[5]
    scores = {i: float(v.astype(np.float64) @ embeddings[probe]) for i, v in embeddings.items()}
    expected = sorted(ids, key=lambda i: (-scores[i], i))
    # The saves of one picture embed equal or a few float32 ulps apart (Triton batches): exact scores closer than
    # float32 resolves (1e-6) form one block, ranked inside by the service's float32 score, then id.
    block, blocks = {}, 0
    for before, i in zip([None] + expected, expected):
        blocks += before is None or scores[before] - scores[i] > 1e-6
        block[i] = blocks
    assert blocks >= 9  # 10 pictures
    for k in (3, 5):
        hits = grpc_pages(lambda k, token: client.stub.SearchImage(pb.SearchImageRequest(
            id=probe, options=pb.SearchOptions(k=k, page_token=token)), timeout=60), k)
        shown = [h.id for h in hits]
        assert sorted(shown) == sorted(ids), f"k={k}: pages showed {len(set(shown))} of 40 items"
        assert [block[i] for i in shown] == [block[i] for i in expected], f"k={k}: not the exact ranking"
        for n in range(1, blocks + 1):  # inside a block: the service's scores, ties by id
            inside = [(-h.score, h.id) for h in hits if block[h.id] == n]
            assert inside == sorted(inside), (k, n, inside)
        np.testing.assert_allclose([h.score for h in hits], [scores[i] for i in shown], atol=1e-5)
    if store == "milvus":  # no keyword index in Milvus 2.3 (FAILED_PRECONDITION: tests/test_search_service.py)
        return
    text = "red dog ball"
    relevance = bm25_oracle(text, dict(zip(ids, titles)))
    keyword = sorted(relevance, key=lambda i: (-float(f"{relevance[i]:.12g}"), i))
    vector = [h.id for h in client.stub.SearchText(pb.SearchTextRequest(text=text, options=pb.SearchOptions(k=100)),
                                                   timeout=60).hits]
    assert sorted(vector) == sorted(ids)
    for mode, expected in [(pb.SearchTextRequest.KEYWORD, keyword),
                           (pb.SearchTextRequest.HYBRID, fused_ids(vector, keyword, 0.5))]:
        for k in (1, 3):
            shown = [h.id for h in grpc_pages(lambda k, token: client.stub.SearchText(pb.SearchTextRequest(
                text=text, mode=mode, options=pb.SearchOptions(k=k, page_token=token)), timeout=60), k)]
            assert shown == expected, (mode, k, len(shown), len(set(shown)), len(expected))


def fused_ids(vector: list[str], keyword: list[str], weight: float) -> list[str]:
    fused: dict[str, float] = {}
    for rank, i in enumerate(vector, 1):
        fused[i] = (1 - weight) / (RRF_K + rank)
    for rank, i in enumerate(keyword, 1):
        fused[i] = fused.get(i, 0.0) + weight / (RRF_K + rank)
    return sorted(fused, key=lambda i: (-fused[i], i))


def test_a_lossy_index_with_min_score_answers_every_hit_it_is_asked_for(tmp_path):
    """A search on compressed codes (IVF-PQ) with min_score: n hits when at least n items pass it. Candidates are
    picked by the codes' estimates, which can fall far below an item's true score; re-scored and cut at min_score
    they left a short answer, and a short answer ends a query's pages (IVF2,PQ4x4 showed 9 of 29 hits)."""
    rng = np.random.default_rng(5)
    dim = 16
    engine = Engine(tmp_path, IndexSettings(factory="IVF2,PQ4x4", nprobe=2, train_per_centroid=2, rerank=1))
    engine.bind_model("test", "random", dim)
    engine.open_index(dim)
    vectors = rng.standard_normal((300, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    engine.add([NewItem(sha256_hex(bytes([n % 256, n // 256])), "mem:", v, data=bytes([n % 256, n // 256]))
                for n, v in enumerate(vectors)])
    assert not engine.index.waiting_for_training
    short = 0
    for _ in range(20):
        query = vectors[rng.integers(len(vectors))] + 0.5 * rng.standard_normal(dim).astype(np.float32)
        query /= np.linalg.norm(query)
        exact = np.sort(vectors @ query)[::-1]
        min_score = float(exact[59])  # 60 items pass
        hits = engine.search(query, 40, min_score=min_score)
        short += len(hits) < 40
        assert all(h.score >= min_score for h in hits)
    engine.close()
    assert not short, f"{short} of 20 searches answered fewer than 40 hits while 60 items passed min_score"


# ---------------------------------------------------------------- bounded work per page (review items 2, 3, 4)
def test_a_tie_heavy_keyword_query_reads_about_k_rows_a_page(tmp_path):
    """3,000 items with one caption (CoCa repeats captions) tie in BM25. Each KEYWORD page (k=10) gets at most
    depth + k + 1 matches from the keyword index and reads that many rows from the store (the index cuts its
    ranking by score, then id); it read the whole tie group (3,000 rows) for every page. The pages are the
    brute-force ranking, ties by id."""
    engine = Engine(tmp_path, IndexSettings(factory="Flat"), schema=SCHEMA)
    engine.bind_model("test", "random", DIM)
    engine.open_index(DIM)
    items = [(0, 4, 1, None, None)] * 3000 + [(0, 0, 0, None, None)] * 3 + [(0, 1, 0, None, None)] * 2
    known = fill(engine, {"groups": [[1, 0, 0, 0]], "items": items})
    rows_read, matches = [], []
    get_many, keyword_search = engine.store.get_many, engine.keywords.search
    engine.store.get_many = lambda vids, *a: rows_read.append(len(vids)) or get_many(vids, *a)
    engine.keywords.search = lambda *a: (lambda found: matches.append(len(found)) or found)(keyword_search(*a))
    q = {"mode": KEYWORD, "k": 10, "vector": [1, 0, 0, 0], "text": "red dog", "colour": None, "min_score": None,
         "order": None, "weight": 0.5, "fusion_depth": 100}
    shown, token = [], ""
    for page in range(5):
        rows_read.clear(), matches.clear()
        hits, token = query_value(q, token).page(engine)
        shown += [h.item.id for h in hits]
        assert max(rows_read) <= 10 * page + 10 + 1 and max(matches) <= 10 * page + 10 + 1, (page, rows_read, matches)
    expected = expected_ids(known, q)
    assert len(expected) == 3005 and shown == expected[:50]
    engine.close()


def test_a_lossy_index_with_an_unreachable_min_score_rescores_a_bounded_pool(tmp_path):
    """min_score on compressed codes widens the candidate pool (x4) while too few pass, but at most
    MAX_RERANK_WIDENING times the first pool (rerank per hit wanted): a min_score no item reaches re-scored the
    whole collection (3,000 items here, and again for every x4 step), now a few hundred candidates."""
    from search_service.engine import MAX_RERANK_WIDENING

    rng = np.random.default_rng(7)
    dim, k, rerank = 16, 10, 4
    engine = Engine(tmp_path, IndexSettings(factory="IVF2,PQ4x4", nprobe=2, train_per_centroid=2, rerank=rerank))
    engine.bind_model("test", "random", dim)
    engine.open_index(dim)
    vectors = rng.standard_normal((3000, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    engine.add([NewItem(sha256_hex(b"v%d" % n), "mem:", v, data=b"v%d" % n) for n, v in enumerate(vectors)])
    assert engine.index.lossy and not engine.index.waiting_for_training
    rescored = []
    exact = engine._exact
    engine._exact = lambda query, n, vids: rescored.append(len(vids)) or exact(query, n, vids)
    query = vectors[0]
    best = float(np.max(vectors @ query))  # 1: the item itself
    hits, token = SearchQuery.build(VECTOR, k, ["unreachable"], min_score=best + 0.5, vector=query).page(engine)
    assert (hits, token) == ([], "")
    first = (k + 1) * rerank  # a page searches k + 1 deep
    # each pool may double to finish a tie of estimates (whole_ties)
    assert rescored and max(rescored) <= 2 * first * MAX_RERANK_WIDENING and sum(rescored) < len(vectors), rescored
    reachable = float(np.sort(vectors @ query)[-5])  # 5 items pass: the answer is still the exact ranking
    hits, _ = SearchQuery.build(VECTOR, k, ["reachable"], min_score=reachable, vector=query).page(engine)
    scores = {default_id(sha256_hex(b"v%d" % n)): float(s) for n, s in enumerate(vectors @ query)}
    expected = sorted((i for i, s in scores.items() if s >= reachable), key=lambda i: (-scores[i], i))
    assert len(expected) == 5 and [h.item.id for h in hits] == expected
    engine.close()


def test_a_milvus_config_deeper_than_its_largest_search_is_refused(tmp_path):
    """Milvus answers at most MAX_TOPK hits a search: pages deeper than that ended early without a word."""
    from search_service.config import ServiceConfig
    from search_service.milvus import MAX_TOPK

    with pytest.raises(ValueError, match=f"at most {MAX_TOPK} with Milvus"):
        ServiceConfig(tmp_path, vector_store="milvus", max_search_depth=MAX_TOPK, max_k=1000)
    assert ServiceConfig(tmp_path, vector_store="milvus", max_search_depth=MAX_TOPK - 1001, max_k=1000)
    assert ServiceConfig(tmp_path, vector_store="faiss", max_search_depth=MAX_TOPK, max_k=1000)  # no such bound
