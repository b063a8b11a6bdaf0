"""The clients against the real thing: one `coca serve --web` (tritonserver + the gRPC search service +
the web gallery; coca-tiny, random weights) for the module, sample photos indexed once. Covers the Python
client (sync and asyncio), the Node.js client, the web gallery in headless Chromium (with a screenshot),
`coca plot --index` and the CLI's search commands going through the client library."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from clients.coca_client import (AddItem, AsyncClient, Client, Condition, DeadlineExceeded,  # noqa: E402
                                 InvalidArgument, NotFound, Outcome, RetryPolicy)

ROOT = Path(__file__).resolve().parents[1]
MODEL, PRETRAINED, SEED = "coca-tiny", "random", 0
NODE_DIR = ROOT / "clients" / "node"
SCREENSHOT_DIR = os.environ.get("COCA_SCREENSHOT_DIR")  # also copy screenshots there (to look at them)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from clients.demo import ServeProcess, sample_photos
    from serving.protocol import CAPTIONER, IMAGE_ENCODER, ONNX_FILE
    from serving.repository import ensure_repository, read_manifest

    data = tmp_path_factory.mktemp("served")
    ensure_repository(data / "model_repository", MODEL, PRETRAINED, SEED)
    # Port 0 for both: `coca serve` binds what the kernel gives and prints where (no port picked here for it)
    command = [sys.executable, "-m", "clients.cli", "serve", "--model", MODEL, "--pretrained", PRETRAINED,
               "--seed", str(SEED), "--data", str(data), "--port", "0", "--web", "0"]
    server = ServeProcess(command, data / "serve.log").start(timeout=300)
    # the defaults, kept by `coca serve` (else it exports again): captions through coca_captioner, ONNX encoders
    assert read_manifest(data / "model_repository")["models"].keys() >= {CAPTIONER}
    assert (data / "model_repository" / IMAGE_ENCODER / "1" / ONNX_FILE).is_file()
    photos = sample_photos(tmp_path_factory.mktemp("photos"))
    try:
        with Client(server.address, timeout=120) as client:
            client.wait_ready(60)
            results = list(client.add_files(photos, {"set": "sample"}))
        yield SimpleNamespace(address=server.address, web=server.web_url, photos=photos, added=results,
                              data=data, process=server)
    finally:
        server.stop()
    assert server.proc.returncode == 0, "".join(server.lines)


@pytest.fixture
def client(served):
    with Client(served.address, timeout=120) as c:
        yield c


def by_name(served, name: str) -> Path:
    return next(p for p in served.photos if p.stem == name)


# ---------------------------------------------------------------- Python client
def test_add_results_are_typed_and_deduplicated(served, client):
    results = served.added
    assert [r.index for r in results] == list(range(len(served.photos)))
    names = [p.stem for p in served.photos]
    cat, chelsea = results[names.index("cat")], results[names.index("chelsea")]
    assert chelsea.outcome is Outcome.ADDED and cat.outcome is Outcome.DUPLICATE and cat.id == chelsea.id
    assert all(r.ok and len(r.content_sha256) == 64 for r in results)
    stats = client.stats()
    assert stats.count == stats.indexed == len(served.photos) - 1
    assert (stats.model, stats.pretrained, stats.triton_ready) == (MODEL, PRETRAINED, True)
    again = list(client.add_files(served.photos[:2]))  # resumable: nothing new
    assert [r.outcome for r in again] == [Outcome.DUPLICATE] * 2


def test_search_caption_get_classify_rank(served, client):
    result = client.search_text("a photo of a cat", k=4, filters={"set": "sample"})
    assert len(result) == 4 and result.searched == len(served.photos) - 1
    scores = [h.score for h in result]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert all(h.metadata == {"set": "sample"} and h.uri.endswith(".jpg") for h in result)
    captioned = client.search_text("a photo of a cat", k=2, with_captions=True)
    assert all(h.caption for h in captioned)
    coffee = by_name(served, "coffee")
    same = client.search_image(coffee, k=1)[0]  # a local file, sent as bytes
    assert same.score == pytest.approx(1.0, abs=1e-4) and same.uri == str(coffee)
    assert client.search_image(id=same.id, k=1)[0].id == same.id
    item = client.get(same.id, include_image=True, include_embedding=True)
    assert item.image == coffee.read_bytes() and item.embedding.dtype == np.float32
    assert item.embedding.shape == (client.stats().embedding_dim,)
    assert np.linalg.norm(item.embedding) == pytest.approx(1.0, abs=1e-4)
    assert client.get(same.id).image is None and client.get(same.id).embedding is None
    caption = client.caption(coffee, max_tokens=8)
    assert caption.text and 1 <= len(caption.tokens) <= 8
    assert client.caption(id=same.id, max_tokens=8).text == caption.text
    labels = client.classify(["cat", "coffee", "rocket"], coffee)
    assert sorted(l.label for l in labels) == ["cat", "coffee", "rocket"]
    assert sum(l.probability for l in labels) == pytest.approx(1.0, abs=1e-4)
    ranked = client.rank(["a cat", "a cup of coffee"], id=same.id)
    assert [r.distance for r in ranked] == sorted(r.distance for r in ranked)


def test_list_conditions_order_and_pages(served, client):
    """List, conditions, order and page tokens through the client, against what the client was told was stored."""
    ids = list(dict.fromkeys(r.id for r in served.added))  # in the order stored (the duplicate shares an id)
    sample = {"set": "sample"}
    listed = list(client.iter_items(filters=sample, page_size=2))
    assert [i.id for i in listed] == ids
    page = client.list(filters=sample, page_size=2)
    assert page.total == len(ids) and len(page.items) == 2 and page.next_page_token
    newest = client.list(filters=sample, order_by="-added_at", page_size=len(ids)).items
    assert [i.id for i in newest] == [i.id for i in sorted(listed, key=lambda i: (-i.created_at, ids.index(i.id)))]
    whole = client.search_text("a photo", k=len(ids), filters=sample)
    paged, token = [], ""
    while True:
        result = client.search_text("a photo", k=3, filters=sample, page_token=token)
        paged += result.hits
        token = result.next_page_token
        if not token:
            break
    assert [(h.id, h.score) for h in paged] == [(h.id, h.score) for h in whole]
    latest = max(i.created_at for i in listed)
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(latest + 1)) + "Z"
    kept = client.search_text("a photo", k=len(ids), where=[Condition("set", any_of=["sample", "other"]),
                                                            Condition("added_at", lt=until)])
    assert [h.id for h in kept] == [h.id for h in whole] and all(h.added_at > 0 for h in kept)
    assert client.search_text("a photo", where=[Condition("added_at", gte=until)]).hits == []
    assert client.search_text("a photo", filters=sample, where=[Condition("set", equals="sample", negate=True)]).hits == []
    with pytest.raises(InvalidArgument, match="range on 'set'"):
        client.list(where=[Condition("set", gte=1)])
    with pytest.raises(ValueError, match="give one of"):
        client.list(where=[Condition("set", equals="a", any_of=["b"])])


def test_keyword_and_hybrid_search_through_the_client(served, client):
    def words(text):
        return "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()

    captioned = client.search_text("a photo", k=3, with_captions=True, filters={"set": "sample"}).hits
    word = words(captioned[0].caption)[0]
    keyword = client.search_text(word, mode="keyword", k=50).hits
    assert captioned[0].id in [h.id for h in keyword] and all(word in words(h.caption) for h in keyword)
    assert [h.keyword_rank for h in keyword] == list(range(1, len(keyword) + 1))
    hybrid = client.search_text(word, mode="hybrid", k=3, keyword_weight=1.0).hits  # the keyword list leads
    top = min(3, len(keyword))
    assert [h.id for h in hybrid][:top] == [h.id for h in keyword][:top] and all(h.keyword_rank for h in hybrid[:top])
    with pytest.raises(ValueError, match="mode must be one of"):
        client.search_text(word, mode="fuzzy")


def test_near_duplicates_through_the_client(served, client):
    from PIL import Image

    stored = {i.id: i.embedding.astype(np.float64) for i in client.iter_items(include_embeddings=True)}
    image = np.asarray(Image.open(by_name(served, "astronaut")).convert("RGB").resize((128, 128)), np.int16)
    noisy = np.clip(image + np.random.default_rng(1).integers(-6, 6, image.shape), 0, 255).astype(np.uint8)
    path = served.data / "astronaut-noisy.png"
    Image.fromarray(noisy).save(path)
    vector = next(client.add([AddItem(image=path, near_duplicate_threshold=1.0, skip_near_duplicates=True,
                                      caption=True)]))
    assert vector.outcome is Outcome.ADDED  # nothing that similar: stored
    assert vector.caption and client.get(vector.id).caption == vector.caption  # captioned as it was added
    mine = client.get(vector.id, include_embedding=True).embedding.astype(np.float64)
    closest = max(stored, key=lambda i: stored[i] @ mine)
    score = float(stored[closest] @ mine)
    again = list(client.add([AddItem(image=by_name(served, "coffee"), near_duplicate_threshold=0.5)]))
    assert again[0].outcome is Outcome.DUPLICATE  # the same content stays a plain duplicate
    groups = []
    page = client.find_duplicates(score - 1e-3, page_size=1, neighbors=20)
    groups += page.groups
    while page.next_page_token:
        page = client.find_duplicates(score - 1e-3, page_size=1, neighbors=20, page_token=page.next_page_token)
        groups += page.groups
    assert len(groups) == page.total_groups
    group = next(g for g in groups if vector.id in g.ids)
    assert closest in group.ids
    assert any({a, b} == {vector.id, closest} and s == pytest.approx(score, abs=1e-4) for a, b, s in group.pairs)
    assert client.delete(vector.id) == vector.id  # leave the module's collection as it was


def test_errors_carry_status_and_message(served, client, tmp_path):
    with pytest.raises(InvalidArgument) as info:
        client.search_text("   ")
    assert "text is empty" in info.value.details and f"SearchText on {served.address}" in str(info.value)
    with pytest.raises(NotFound, match="no item with id 'nope'"):
        client.get("nope")
    with pytest.raises(DeadlineExceeded):  # a text never asked before: no cached embedding answers in time
        client.search_text(f"a cat {uuid.uuid4().hex}", timeout=0.001)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    results = list(client.add_files([broken, tmp_path / "missing.jpg", by_name(served, "rocket")]))
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED, Outcome.DUPLICATE]
    assert "not an image" in results[0].error.message
    assert "missing.jpg: cannot read" in results[1].error.message


def test_delete(served, client, tmp_path):
    from PIL import Image

    extra = tmp_path / "extra.png"
    Image.new("RGB", (40, 30), (10, 120, 200)).save(extra)
    added = next(client.add_files([extra]))
    assert added.outcome is Outcome.ADDED
    assert client.delete(added.id) == added.id
    with pytest.raises(NotFound):
        client.delete(added.id)


def test_async_client(served):
    async def main():
        async with AsyncClient(served.address, timeout=60) as client:
            queries = ["a cat", "a rocket", "the moon", "coins"]
            results = await asyncio.gather(*(client.search_text(q, k=3) for q in queries))
            assert [len(r) for r in results] == [3] * 4
            added = [r async for r in client.add([by_name(served, "moon")])]
            assert added[0].outcome is Outcome.DUPLICATE
            with pytest.raises(NotFound):
                await client.get("nope")
            return await client.stats()

    assert asyncio.run(main()).count == len(served.photos) - 1


def test_caption_stream_sync_async_and_cli(served, client, tiny_coca, capsys):
    """caption_stream (sync and asyncio) and `coca caption --server --stream`: the pieces, as they came,
    add up to caption()'s text, which is the in-process caption; stopping early cancels the call."""
    photo = by_name(served, "coffee")
    want = client.caption(photo, max_tokens=10)
    assert want.text == tiny_coca.caption([str(photo)], max_tokens=10)[0].text
    chunks = list(client.caption_stream(photo, max_tokens=10))
    assert len(chunks) > 1 and "".join(c.piece for c in chunks) == chunks[-1].text == want.text
    assert chunks[-1].done and chunks[-1].caption == want and not any(c.done for c in chunks[:-1])

    async def streamed():
        async with AsyncClient(served.address, timeout=60) as aclient:
            return [c async for c in aclient.caption_stream(photo, max_tokens=10)]

    assert asyncio.run(streamed()) == chunks
    with pytest.raises(InvalidArgument, match="top_p"):
        list(client.caption_stream(photo, top_p=2.0))
    stream = client.caption_stream(photo, min_tokens=75, max_tokens=75)
    next(stream)
    stream.close()  # cancels: the next calls are served as usual
    code, out, err = coca(capsys, "caption", str(photo), "--server", served.address, "--max-tokens", "10", "--stream")
    assert code == 0 and out == f"{photo}\t{want.text}\n", err
    code, plain, err = coca(capsys, "caption", str(photo), "--server", served.address, "--max-tokens", "10",
                            "--no-stream")
    assert code == 0 and plain == out
    code, out, err = coca(capsys, "caption", str(photo), "--server", served.address, "--top-p", "2")
    assert code == 2 and "top_p" in err and len(err.strip().splitlines()) == 1
    code, out, err = coca(capsys, "caption", "--id", "nope", "--server", served.address)
    assert code == 2 and "NOT_FOUND" in err


def test_unreachable_service_is_retried_then_explained():
    started = time.monotonic()
    with Client("127.0.0.1:1", retry=RetryPolicy(attempts=3, initial_backoff=0.05)) as client:
        with pytest.raises(Exception) as info:
            client.stats(timeout=10)
    assert info.value.attempts == 3 and "Is the search service running there?" in str(info.value)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- CLI
def coca(capsys, *args) -> tuple[int, str, str]:
    """`coca ARGS` in this process (the model library is imported already; a new interpreter pays ~10 s)."""
    from clients.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_search_goes_through_the_client(served, capsys):
    code, out, err = coca(capsys, "search", "a rocket", "-k", "2", "--server", served.address)
    assert code == 0, err
    assert len([l for l in out.splitlines() if re.match(r"\s*\d+\s+-?\d\.\d{3}\s", l)]) == 2
    code, out, err = coca(capsys, "search", "a rocket", "--server", "127.0.0.1:1", "--timeout", "3")
    assert code == 1 and "UNAVAILABLE" in err and "Start one with `coca serve`" in err
    code, out, err = coca(capsys, "search", "   ", "--server", served.address)
    assert code == 2 and "INVALID_ARGUMENT: text is empty" in err
    args = ["search", "a rocket", "-k", "2", "--server", served.address, "--where", "set=sample|other",
            "--where", "added_at>=2000-01-01", "--order-by=-added_at"]
    code, out, err = coca(capsys, *args)
    with Client(served.address) as client:
        newest = client.list(filters={"set": "sample"}, order_by="-added_at", page_size=3).items
    def hit_ids(out):
        return [l.split()[2] for l in out.splitlines() if re.match(r"\s*\d+\s+-?\d\.\d{3}\s", l)]

    assert code == 0 and hit_ids(out) == [i.id for i in newest[:2]], (out, err)
    token = out.splitlines()[-1].split("--page-token ")[1]
    code, out, err = coca(capsys, *args, "--page-token", token)
    assert code == 0 and hit_ids(out)[0] == newest[2].id, out
    code, out, err = coca(capsys, "search", "a rocket", "--server", served.address, "--where", "set~x")
    assert code == 2 and "--where 'set~x'" in err
    code, out, err = coca(capsys, "search", "a rocket", "--server", served.address, "--mode", "keyword",
                          "--where", "set>=1")
    assert code == 2 and "range on 'set'" in err


def test_cli_list_duplicates_and_index_options(served, client, capsys, tmp_path):
    """`coca list` pages are List's, `coca duplicates` groups FindDuplicates', `coca index` takes the add options;
    bad input: exit 2 and one line."""
    from PIL import Image

    listed = lambda out: [l.split()[2] for l in out.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", l)]
    newest = client.list(filters={"set": "sample"}, order_by="-added_at", page_size=4).items
    args = ["list", "--server", served.address, "--filter", "set=sample", "--order-by=-added_at", "--page-size", "2"]
    code, out, err = coca(capsys, *args)
    assert code == 0 and listed(out) == [i.id for i in newest[:2]], (out, err)
    code, out, err = coca(capsys, *args, "--page-token", out.splitlines()[-1].split("--page-token ")[1])
    assert code == 0 and listed(out) == [i.id for i in newest[2:4]], (out, err)
    for bad, message in [(["--where", "set>=1"], "range on 'set'"), (["--where", "set~x"], "--where 'set~x'"),
                         (["--page-token", "nope"], "page_token")]:
        code, out, err = coca(capsys, "list", "--server", served.address, *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (bad, err)

    page = client.find_duplicates(0.3, page_size=1, neighbors=20)
    code, out, err = coca(capsys, "duplicates", "--server", served.address, "--threshold", "0.3", "--page-size", "1",
                          "--neighbors", "20")
    assert code == 0 and f"group 1: {' '.join(page.groups[0].ids)}" in out.splitlines(), (out, err)
    assert out.splitlines()[-1] == f"next page: --page-token {page.next_page_token}" if page.next_page_token \
        else "next page" not in out
    pairs = [l.split() for l in out.splitlines() if l.startswith("  ")]
    assert [(a, b, float(score)) for score, a, b in pairs] == [(a, b, round(s, 4)) for a, b, s in page.groups[0].pairs]
    code, out, err = coca(capsys, "duplicates", "--server", served.address, "--threshold", "1.5")
    assert code == 2 and "threshold" in err and len(err.strip().splitlines()) == 1, err

    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 52, 3), np.uint8)).save(folder / "noise.png")
    best = client.search_image(folder / "noise.png", k=1)[0]
    code, out, err = coca(capsys, "index", str(folder), "--server", served.address, "--near-duplicates",
                          f"{best.score - 1e-3:.5f}", "--skip-near-duplicates")
    assert code == 0 and f"noise.png: near-duplicate of {best.id}" in out and "not stored" in out, (out, err)
    assert "0 added, 0 already indexed, 1 near-duplicates" in out
    code, out, err = coca(capsys, "index", str(folder), "--server", served.address, "--captions")
    assert code == 0 and "1 added" in out, (out, err)
    stored = client.search_image(folder / "noise.png", k=1)[0]
    assert stored.score == pytest.approx(1.0, abs=1e-4) and client.get(stored.id).caption
    client.delete(stored.id)  # leave the module's collection as it was
    for bad in (["--near-duplicates", "0"], ["--skip-near-duplicates"], ["--ray", "--captions"]):
        code, out, err = coca(capsys, "index", str(folder), "--server", served.address, *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)


def test_plot_index(served, tmp_path, capsys):
    from PIL import Image

    out_png = tmp_path / "tsne.png"
    code, out, err = coca(capsys, "plot", "--index", "--server", served.address, "--out", str(out_png))
    assert code == 0, err
    assert f"plotting all {len(served.photos) - 1} indexed images (tsne)" in out
    code, out, err = coca(capsys, "plot", "--index", "--server", served.address, "--limit", "2", "--filter",
                          "set=sample", "--out", str(tmp_path / "first.png"), "--method", "pca")
    assert code == 0 and f"plotting the first 2 of {len(served.photos) - 1} matching images" in out, err
    assert Image.open(out_png).size[0] > 300
    code, out, err = coca(capsys, "plot", "--index", "--server", served.address, "--limit", "3", "--query", "a cat",
                          "--out", str(tmp_path / "few.png"), "--method", "pca")
    assert code == 0 and "the 3 nearest to 'a cat' of" in out


# ---------------------------------------------------------------- Node.js client
def test_node_client(served, client):
    if shutil.which("node") is None:
        pytest.skip("node is not installed (the Node.js client needs Node >= 18)")
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "clients/node/node_modules is missing: run `npm ci` in clients/node (scripts/bootstrap.sh does)"
    script = NODE_DIR / "search.js"
    run = lambda *a: subprocess.run(["node", str(script), "--target", served.address, *a], capture_output=True,
                                    text=True, timeout=60)
    printed = run("a photo of a cat", "-k", "5")
    assert printed.returncode == 0, printed.stderr
    expected = client.search_text("a photo of a cat", k=5)
    lines = printed.stdout.splitlines()
    assert lines[0] == f'5 hits for "a photo of a cat" ({expected.searched} images searched)'
    rows = [l.split() for l in lines[2:] if re.match(r"\s*\d+\s+-?\d\.\d{3}\s", l)]  # not caption lines
    assert [r[2] for r in rows] == [h.id for h in expected] and [r[3] for r in rows] == [h.uri for h in expected]
    assert [r[1] for r in rows] == [f"{h.score:.3f}" for h in expected]
    as_json = json.loads(run("a photo of a cat", "-k", "2", "--captions", "--json").stdout)
    assert [h["id"] for h in as_json["hits"]] == [h.id for h in expected][:2]
    assert all(h["caption"] for h in as_json["hits"])
    bad = run("   ")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "text is empty" in bad.stderr
    # Conditions, order and pages from the command line: the Python client's pages.
    query = ["a photo", "-k", "2", "--where", "set=sample|other", "--where", "added_at>=2000-01-01",
             "--order-by", "-added_at", "--json"]
    where = [Condition("set", any_of=["sample", "other"]), Condition("added_at", gte="2000-01-01")]
    pages = python_pages(client.search_text, text="a photo", k=2, where=where, order_by="-added_at")
    token = ""
    for page in pages[:2]:
        printed = json.loads(run(*query, *(["--page-token", token] if token else [])).stdout)
        assert [h["id"] for h in printed["hits"]] == [h.id for h in page.hits]
        assert printed["next_page_token"] == page.next_page_token
        token = printed["next_page_token"]
    for args, message in [(["--where", "set>=1"], "range on 'set'"), (["--where", "set~1"], "--where"),
                          (["--mode", "fuzzy"], "--mode")]:
        bad = run("a photo", *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def node_answers(served, calls: list[dict]) -> list:
    """The Node client's answers to `calls` (tests/node/answers.js)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (the Node.js client needs Node >= 18)")
    done = subprocess.run(["node", str(ROOT / "tests" / "node" / "answers.js"), served.address, json.dumps(calls)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def hit_rows(hits) -> list[tuple]:
    """What both clients must agree on about hits: id, rank in each list, score (to float32 precision)."""
    get = (lambda h, k: h[k]) if hits and isinstance(hits[0], dict) else getattr
    return [(get(h, "id"), get(h, "vector_rank"), get(h, "keyword_rank"), round(float(get(h, "score")), 5))
            for h in hits]


def python_pages(call, **query) -> list:
    pages, token = [], ""
    while True:
        page = call(**query, page_token=token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


def test_node_client_lists_pages_modes_conditions_and_duplicates(served, client, tmp_path):
    """The Node client's List pages, SearchText modes with conditions, order and pages, FindDuplicates and
    near-duplicate add options give the Python client's answers (the oracle) on the same collection."""
    from PIL import Image

    captioned = client.search_text("a photo", k=3, with_captions=True, filters={"set": "sample"}).hits
    word = "".join(ch.lower() if ch.isalnum() else " " for ch in captioned[0].caption).split()[0]
    where = [{"field": "set", "anyOf": ["sample", "other"]}, {"field": "added_at", "gte": "2000-01-01"}]
    py_where = [Condition("set", any_of=["sample", "other"]), Condition("added_at", gte="2000-01-01")]
    image = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), np.uint8)).save(image)
    best = client.search_image(image, k=1)[0]  # the stored item closest to the new image (Flat index: exact)
    near = {"file": str(image), "nearDuplicateThreshold": round(best.score - 1e-3, 5), "skipNearDuplicates": True}
    calls = [{"call": "pages", "method": "list", "args": [{"orderBy": "-added_at", "pageSize": 2}]},
             {"call": "items", "args": [{"filters": {"set": "sample"}, "pageSize": 3}]},
             {"call": "pages", "method": "searchText", "args": [word, {"mode": "keyword", "k": 2}]},
             {"call": "pages", "method": "searchText",
              "args": [word, {"mode": "hybrid", "keywordWeight": 0.3, "k": 2, "where": where}]},
             {"call": "pages", "method": "searchText",
              "args": ["a photo", {"k": 2, "where": where, "orderBy": "-added_at", "minScore": -1}]},
             {"call": "pages", "method": "findDuplicates", "args": [{"threshold": 0.3, "pageSize": 1, "neighbors": 20}]},
             {"call": "add", "args": [[near, {"file": str(by_name(served, "coffee")), "nearDuplicateThreshold": 0.5}]]},
             {"call": "searchText", "args": [word, {"mode": "fuzzy"}]},
             {"call": "list", "args": [{"where": [{"field": "set", "gte": "1"}]}]}]
    (listed, items, keyword, hybrid, ordered, duplicates, added, bad_mode, bad_range) = node_answers(served, calls)

    py_list = python_pages(client.list, order_by="-added_at", page_size=2)
    assert [[i["id"] for i in p["items"]] for p in listed] == [[i.id for i in p.items] for p in py_list]
    assert [p["next_page_token"] for p in listed] == [p.next_page_token for p in py_list]
    assert all(p["total"] == py_list[0].total for p in listed)
    assert [i["id"] for i in items] == [i.id for i in client.iter_items(filters={"set": "sample"}, page_size=3)]
    py_keyword = python_pages(client.search_text, text=word, mode="keyword", k=2)
    assert [hit_rows(p["hits"]) for p in keyword] == [hit_rows(p.hits) for p in py_keyword]
    assert keyword[0]["hits"] and all(h["keyword_rank"] for p in keyword for h in p["hits"])
    py_hybrid = python_pages(client.search_text, text=word, mode="hybrid", keyword_weight=0.3, k=2, where=py_where)
    assert [hit_rows(p["hits"]) for p in hybrid] == [hit_rows(p.hits) for p in py_hybrid]
    py_ordered = python_pages(client.search_text, text="a photo", k=2, where=py_where, order_by="-added_at", min_score=-1)
    assert [hit_rows(p["hits"]) for p in ordered] == [hit_rows(p.hits) for p in py_ordered]
    assert len(py_ordered) > 1  # it did page
    py_groups = [g for p in python_pages(client.find_duplicates, threshold=0.3, page_size=1, neighbors=20)
                 for g in p.groups]
    node_groups = [g for p in duplicates for g in p["groups"]]
    assert [g["ids"] for g in node_groups] == [g.ids for g in py_groups] and py_groups
    assert [[(q["a"], q["b"], round(q["score"], 5)) for q in g["pairs"]] for g in node_groups] == \
        [[(a, b, round(score, 5)) for a, b, score in g.pairs] for g in py_groups]
    skipped, same = added
    assert (skipped["outcome"], skipped["id"], skipped["near_duplicate"]["id"]) == ("NEAR_DUPLICATE", "", best.id)
    assert skipped["near_duplicate"]["score"] == pytest.approx(best.score, abs=1e-4)
    assert client.search_image(image, k=1)[0].id == best.id  # not stored
    assert (same["outcome"], same["id"]) == ("DUPLICATE", next(r.id for r in served.added
                                                              if r.index == served.photos.index(by_name(served, "coffee"))))
    assert "mode must be one of" in bad_mode["error"]
    assert bad_range["code"] == "INVALID_ARGUMENT" and "range on 'set'" in bad_range["error"]


def test_node_caption_stream(served, client):
    """Node's captionStream (clients/node/caption.js): the pieces it printed as they came are the Python
    client's caption of the same image; --json shows the chunks growing; bad input exits 2."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (the Node.js client needs Node >= 18)")
    photo = by_name(served, "coffee")
    run = lambda *a: subprocess.run(["node", str(NODE_DIR / "caption.js"), "--target", served.address, *a],
                                    capture_output=True, text=True, timeout=60)
    want = client.caption(photo, max_tokens=10).text
    printed = run(str(photo), "--max-tokens", "10")
    assert printed.returncode == 0 and printed.stdout == want + "\n", printed.stderr
    chunks = [json.loads(line) for line in run(str(photo), "--max-tokens", "10", "--json").stdout.splitlines()]
    assert len(chunks) > 1 and [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["piece"] for c in chunks) == chunks[-1]["caption"]["text"] == want
    item = served.added[0].id
    assert run("--id", item, "--max-tokens", "10").stdout.strip() == client.caption(id=item, max_tokens=10).text
    bad = run(str(photo), "--max-tokens", "76")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "max_tokens" in bad.stderr


# ---------------------------------------------------------------- web gallery
def http(url: str, data: bytes | None = None) -> tuple[int, dict | bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body, status, kind = response.read(), response.status, response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        body, status, kind = exc.read(), exc.code, exc.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body


def test_web_api(served, client):
    base = served.web.rstrip("/")
    status, stats = http(f"{base}/api/stats")
    assert status == 200 and stats["count"] == len(served.photos) - 1 and stats["random_weights"] is True
    status, found = http(f"{base}/api/search?q=a%20rocket&k=3")
    assert status == 200 and len(found["hits"]) == 3
    status, thumb = http(base + found["hits"][0]["thumb"])
    assert status == 200 and thumb[:2] == b"\xff\xd8"  # a JPEG
    status, similar = http(f"{base}/api/search-image?k=1", by_name(served, "clock").read_bytes())
    assert status == 200 and similar["hits"][0]["name"] == "clock.jpg" and similar["hits"][0]["score"] > 0.999
    status, caption = http(f"{base}/api/caption?id={similar['hits'][0]['id']}", b"")
    assert status == 200 and caption["caption"]
    # Errors: a status and a message, never a file outside the gallery's own pages.
    assert http(f"{base}/api/search?q=%20")[0] == 400
    assert http(f"{base}/api/search?q=x&k=lots")[0] == 400
    status, error = http(f"{base}/api/caption", b"not an image")
    assert status == 400 and "not an image" in error["error"]
    assert http(f"{base}/thumb/nope")[0] == 404
    # A search with captions stores them: POST only (a cross-site link or <img> cannot start 100 captions).
    status, error = http(f"{base}/api/search?q=a%20rocket&k=2&captions=1")
    assert status == 405 and "POST" in error["error"]
    status, captioned = http(f"{base}/api/search?q=a%20rocket&k=2&captions=1", b"")
    assert status == 200 and all(h["caption"] for h in captioned["hits"])
    assert [h["id"] for h in captioned["hits"]] == [h["id"] for h in found["hits"][:2]]
    # Browse, conditions, modes, near-duplicates: the client's answers; bad input is a 400 that says what.
    status, listed = http(f"{base}/api/list?page_size=2&order_by=-added_at&where=set%3Dsample%7Cother")
    page = client.list(page_size=2, order_by="-added_at", where=[Condition("set", any_of=["sample", "other"])])
    assert status == 200 and [i["id"] for i in listed["items"]] == [i.id for i in page.items]
    assert (listed["total"], listed["next_page_token"]) == (page.total, page.next_page_token)
    status, second = http(f"{base}/api/list?page_size=2&order_by=-added_at&where=set%3Dsample%7Cother"
                          f"&page_token={listed['next_page_token']}")
    page = client.list(page_size=2, order_by="-added_at", where=[Condition("set", any_of=["sample", "other"])],
                       page_token=page.next_page_token)
    assert status == 200 and [i["id"] for i in second["items"]] == [i.id for i in page.items]
    status, groups = http(f"{base}/api/duplicates?threshold=0.3&page_size=2")
    expected = client.find_duplicates(0.3, page_size=2)
    assert status == 200 and [[i["id"] for i in g["items"]] for g in groups["groups"]] == \
        [g.ids[:24] for g in expected.groups] and groups["total_groups"] == expected.total_groups
    for path, message in [("/api/list?where=set~x", "condition"), ("/api/list?where=set%3E%3D1", "range on 'set'"),
                          ("/api/search?q=x&mode=fuzzy", "mode must be"), ("/api/duplicates?threshold=abc", "threshold"),
                          ("/api/list?page_token=nope", "page_token"), ("/api/list?page_size=x", "page_size"),
                          ("/api/list?" + "&".join(["where=a%3D1"] * 17), "at most 16 conditions")]:
        status, error = http(base + path)
        assert status == 400 and message in error["error"], (path, status, error)
    for path in ["/../../etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/server.py",
                 "/thumb/..%2f..%2fetc%2fpasswd"]:
        assert http(base + path)[0] == 404, path


@pytest.fixture
def lone_gallery():
    """The gallery with no service behind it: its Host, Origin and method checks come before any call."""
    from clients.web.server import start_gallery

    with Client("127.0.0.1:1", timeout=5) as client:
        gallery = start_gallery(0, client)
        try:
            yield gallery
        finally:
            gallery.stop()


def raw_request(gallery, method: str, path: str, headers: dict) -> tuple[int, str, str | None]:
    """A request with exactly these headers (Host included), as another site's page could make it."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", gallery.server_address[1], timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode(), response.getheader("Allow")
    finally:
        connection.close()


def test_web_gallery_answers_its_own_pages_only(lone_gallery):
    """DNS rebinding (a foreign Host) gets 421, another site's requests 403, GET with captions 405."""
    port = lone_gallery.server_address[1]
    own = {"Host": f"127.0.0.1:{port}"}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"):
        assert raw_request(lone_gallery, "GET", "/", {"Host": host})[0] == 200, host
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{port + 1}", "127.0.0.1", ""):
        for path in ("/", "/api/stats", "/thumb/abc"):
            status, body, _ = raw_request(lone_gallery, "GET", path, {"Host": host})
            assert status == 421 and "DNS-rebinding" in body, (host, path, status)
    foreign = [("POST", "/api/caption?id=x", {"Origin": "http://attacker.example", "Content-Length": "0"}),
               ("GET", "/api/stats", {"Origin": "null"}),
               ("GET", "/api/stats", {"Origin": f"http://localhost:{port + 1}"}),
               ("GET", "/thumb/abc", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}),
               ("GET", "/api/stats", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}),
               ("POST", "/api/search?q=cat&captions=1", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                                          "Content-Length": "0"})]  # a cross-site form
    for method, path, headers in foreign:
        status, body, _ = raw_request(lone_gallery, method, path, {**own, **headers})
        assert status == 403 and "refused" in body, (method, path, headers, status, body)
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}  # a link to the gallery: its page
    assert raw_request(lone_gallery, "GET", "/", {**own, **link})[0] == 200
    assert raw_request(lone_gallery, "GET", "/app.js", {**own, "Origin": f"http://127.0.0.1:{port}",
                                                         "Sec-Fetch-Site": "same-origin"})[0] == 200
    for path in ("/api/search?q=cat&captions=1", "/api/similar?id=x&captions=true"):
        status, body, allow = raw_request(lone_gallery, "GET", path, own)
        assert (status, allow) == (405, "POST") and "POST" in body, (path, status, body)


def test_web_gallery_in_a_browser(served, client, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    cards = lambda: browser.find_elements(By.CSS_SELECTOR, "#results .card")
    browser.get(served.web)
    wait.until(lambda b: "images" in b.find_element(By.ID, "stats").text)
    assert browser.find_element(By.ID, "banner").is_displayed()  # random weights: said loudly
    assert f"{len(served.photos) - 1} images · {MODEL} ({PRETRAINED})" in browser.find_element(By.ID, "stats").text

    # Text search: type, press Enter, see the hits in the service's order, thumbnails loaded.
    browser.find_element(By.ID, "query").send_keys("a photo of a cat", Keys.ENTER)
    wait.until(lambda b: len(cards()) == len(served.photos) - 1)
    expected = client.search_text("a photo of a cat", k=12)
    assert [c.get_attribute("data-id") for c in cards()] == [h.id for h in expected]
    shown = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards()]
    np.testing.assert_allclose(shown, [h.score for h in expected], atol=1.5e-3)
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                             for i in b.find_elements(By.CSS_SELECTOR, ".thumb")))
    assert "for “a photo of a cat”" in browser.find_element(By.ID, "status").text

    # Caption a hit from its card.
    first = cards()[0]
    first.find_element(By.CSS_SELECTOR, ".caption-hit").click()
    wait.until(lambda b: cards()[0].find_element(By.CSS_SELECTOR, ".caption").text not in ("", "captioning…"))
    assert cards()[0].find_element(By.CSS_SELECTOR, ".caption").text == client.caption(id=expected[0].id).text

    # Upload an image: caption it, then find images like it (itself first, score 1).
    browser.find_element(By.ID, "upload").send_keys(str(by_name(served, "astronaut")))
    browser.find_element(By.ID, "caption-button").click()
    wait.until(lambda b: b.find_element(By.ID, "upload-caption").text not in ("", "captioning…"))
    assert browser.find_element(By.ID, "upload-caption").text == client.caption(by_name(served, "astronaut")).text
    browser.find_element(By.ID, "image-search-button").click()
    wait.until(lambda b: "for “uploaded image”" in b.find_element(By.ID, "status").text)  # rendered
    top = cards()[0]
    assert top.find_element(By.CSS_SELECTOR, ".name").text == "astronaut.jpg"
    assert top.find_element(By.CSS_SELECTOR, ".score").text == "1.000"

    # Back to the text search for the picture; then an error is shown, not thrown.
    browser.find_element(By.ID, "query").clear()
    browser.find_element(By.ID, "query").send_keys("a photo of a cat", Keys.ENTER)
    wait.until(lambda b: "for “a photo of a cat”" in b.find_element(By.ID, "status").text)
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                             for i in b.find_elements(By.CSS_SELECTOR, ".thumb")))
    shot = tmp_path / "gallery.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(SCREENSHOT_DIR) / "gallery.png")
    browser.execute_script("document.getElementById('query').value = '   '")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda b: "Type something" in b.find_element(By.ID, "status").text)


def test_web_gallery_pages_conditions_modes_and_duplicates_in_a_browser(served, client, browser):
    """Browse with a condition and an order, page by page (forward, then back): the pages are List's pages, in
    order; a keyword search shows the Python client's hits and which list found each; near-duplicate groups are
    FindDuplicates'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    shown = lambda: [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
    status = lambda: browser.find_element(By.ID, "status").text
    browser.get(served.web)
    wait.until(lambda b: "images" in b.find_element(By.ID, "stats").text)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("3")
    Select(browser.find_element(By.ID, "order")).select_by_value("-added_at")
    browser.find_element(By.ID, "condition-field").send_keys("set")
    browser.find_element(By.ID, "condition-value").send_keys("sample|other", Keys.ENTER)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#conditions li span").text == "set=sample|other")

    pages = python_pages(client.list, where=[Condition("set", any_of=["sample", "other"])], order_by="-added_at",
                         page_size=3)
    assert len(pages) >= 3  # the test pages forward and back
    browser.find_element(By.ID, "browse-button").click()
    seen = []
    for number, page in enumerate(pages, 1):
        wait.until(lambda b: f"· page {number} ·" in status())
        seen.append(shown())
        assert f"of {page.total} images" in status()
        if number < len(pages):
            browser.find_element(By.ID, "next-page").click()
    assert seen == [[i.id for i in p.items] for p in pages]
    assert not browser.find_element(By.ID, "next-page").is_enabled()
    browser.find_element(By.ID, "previous-page").click()
    wait.until(lambda b: f"· page {len(pages) - 1} ·" in status())
    assert shown() == [i.id for i in pages[-2].items]

    # Keyword search: the words of a caption; each card says which list found it.
    captioned = client.search_text("a photo", k=3, with_captions=True, filters={"set": "sample"}).hits
    word = "".join(ch.lower() if ch.isalnum() else " " for ch in captioned[0].caption).split()[0]
    expected = client.search_text(word, mode="keyword", k=3, where=[Condition("set", any_of=["sample", "other"])])
    Select(browser.find_element(By.ID, "mode")).select_by_visible_text("keyword")
    Select(browser.find_element(By.ID, "order")).select_by_value("")
    browser.find_element(By.ID, "query").send_keys(word, Keys.ENTER)
    wait.until(lambda b: f"for “{word}”" in status())
    assert shown() == [h.id for h in expected.hits] and expected.hits
    lists = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .card .lists")]
    assert lists == [f"keyword #{h.keyword_rank}" for h in expected.hits]

    # Near-duplicate groups at a low threshold (random weights: everything is alike), first page.
    threshold = browser.find_element(By.ID, "threshold")
    threshold.clear()
    threshold.send_keys("0.3")
    browser.find_element(By.ID, "duplicates-button").click()
    groups = client.find_duplicates(0.3, page_size=3)
    wait.until(lambda b: f"of {groups.total_groups} groups of near-duplicates" in status())
    sections = browser.find_elements(By.CSS_SELECTOR, "#results .group")
    assert [[c.get_attribute("data-id") for c in s.find_elements(By.CSS_SELECTOR, ".card")] for s in sections] == \
        [g.ids[:24] for g in groups.groups]
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SCREENSHOT_DIR) / "gallery-duplicates.png"))
