"""Bulk ingest on Ray Data (`coca index SOURCE --ray`) against real parts: a local Ray cluster (2 CPUs,
fractional CPUs per task and actor), a real tritonserver (coca-tiny, random weights), the real search
service in its own process (SQLite + FAISS). The oracle is the corpus itself: which bytes each source
holds (so which id and sha256 it must get, or why it must fail), what metadata it was given, and the
in-process model's embeddings. Also the service side of it: FindContent and precomputed embeddings."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

from search_service.pb import search_pb2 as pb  # noqa: E402
from search_service.testing import ServiceProcess, WireClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGE_BYTES = 256 << 10  # the test's size limit: one file is made larger than this
ADDED, DUPLICATE, FAILED = pb.AddImageResult.ADDED, pb.AddImageResult.DUPLICATE, pb.AddImageResult.FAILED


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def triton(plain_triton):
    """coca-tiny with random weights (seed 0): what `reference` computes in process."""
    return plain_triton.grpc_url


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs, as in CI (read tasks take 0.5 CPU, actors 0.25)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_coca):
    """The in-process model Triton serves (conftest's coca-tiny, random weights from seed 0)."""
    return tiny_coca


def service(tmp_path_factory, triton, *args):
    return ServiceProcess(tmp_path_factory.mktemp("data"), triton, *args)


@pytest.fixture(scope="module")
def plain_service(tmp_path_factory, triton):
    """A service as started by default: it embeds every image itself."""
    with service(tmp_path_factory, triton) as process:
        yield process


@pytest.fixture(scope="module")
def trusting_service(tmp_path_factory, triton):
    """A service that takes precomputed embeddings (what `--ray --triton` needs)."""
    with service(tmp_path_factory, triton, "--accept-embeddings") as process:
        yield process


# ---------------------------------------------------------------- the corpus: 200 items, a known fate each
@dataclass
class Case:
    source: str  # as the pipeline reports it
    data: Optional[bytes]  # the bytes it names (None: none)
    metadata: dict = field(default_factory=dict)
    failure: Optional[tuple[str, str]] = None  # (gRPC status name, words the reason must contain)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def jpeg(rng, size=(48, 40)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def bad_files(rng) -> dict[str, tuple[bytes, tuple[str, str]]]:
    """name -> (bytes, expected failure): one of each kind of bad image."""
    truncated = jpeg(rng)
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP in a few kB
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big, format="PNG")  # ~480 kB of noise
    assert len(big.getvalue()) > MAX_IMAGE_BYTES
    return {
        "text.jpg": (b"this is not an image", ("INVALID_ARGUMENT", "not an image")),
        "truncated.jpg": (truncated[: len(truncated) // 2], ("INVALID_ARGUMENT", "truncated")),
        "bomb.png": (bomb.getvalue(), ("INVALID_ARGUMENT", "decompression bomb")),
        "huge.png": (big.getvalue(), ("RESOURCE_EXHAUSTED", "size limit")),
        "empty.png": (b"", ("INVALID_ARGUMENT", "empty file")),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 120 files and a Parquet manifest of 80 rows (200 items): distinct images, the same
    bytes under several names (within and across the two sources), and bad items of every kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    top = tmp_path_factory.mktemp("corpus")
    folder, listed = top / "folder", top / "listed"
    folder.mkdir(), listed.mkdir()
    cases: dict[str, list[Case]] = {"folder": [], "manifest": []}
    shared = {"batch": "bulk"}
    images = [jpeg(rng) for _ in range(180)]
    for i in range(110):  # 110 distinct, then 5 copies of some of them under other names
        (folder / f"img{i:03d}.jpg").write_bytes(images[i])
    for j, i in enumerate([3, 3, 17, 50, 109]):
        (folder / f"copy{j}.jpg").write_bytes(images[i])
    bad = bad_files(rng)
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    for path in sorted(folder.iterdir()):
        cases["folder"].append(Case(str(path), path.read_bytes(), shared, bad.get(path.name, (None, None))[1]))
    assert len(cases["folder"]) == 120

    rows = []
    for i in range(110, 180):  # 70 new images in a sub-folder, named relative to the manifest
        (listed / f"row{i}.jpg").write_bytes(images[i])
        rows.append((f"listed/row{i}.jpg", images[i], {"caption": f"picture {i}", "label": str(i % 7)}, None))
    for i in (0, 1, 110, 111, 112):  # the same bytes as folder images / earlier rows, another file each
        (listed / f"again{i}.jpg").write_bytes(images[i])
        rows.append((f"listed/again{i}.jpg", images[i], {"caption": f"again {i}"}, None))
    rows += [("listed/missing.jpg", None, {"caption": "gone"}, ("NOT_FOUND", "no such file")),
             (None, None, {"caption": "no path"}, ("INVALID_ARGUMENT", "empty path")),
             ("https://example.com/a.jpg", None, {"caption": "remote"}, ("INVALID_ARGUMENT", "http(s) is not downloaded")),
             ("listed/text.jpg", b"plain text", {"caption": "text"}, ("INVALID_ARGUMENT", "not an image")),
             ("listed/img0.png", images[2], {}, None)]
    (listed / "text.jpg").write_bytes(b"plain text")
    (listed / "img0.png").write_bytes(images[2])
    table = pa.table({"path": [r[0] for r in rows],
                      "caption": [r[2].get("caption") for r in rows],  # None -> no metadata entry
                      "label": [int(r[2]["label"]) if "label" in r[2] else None for r in rows]})
    pq.write_table(table, top / "manifest.parquet")
    for path, data, metadata, failure in rows:
        source = "" if path is None else path if "://" in path else str(top / path)
        cases["manifest"].append(Case(source, data, {**shared, **metadata}, failure))
    assert len(cases["manifest"]) == 80
    return {"folder": str(folder), "manifest": str(top / "manifest.parquet"), "cases": cases, "metadata": shared}


def run_both(corpus, address: str, tritons: list[str]) -> list:
    """Both sources in one pipeline: the outcomes."""
    from clients.ray_ingest.pipeline import IngestPlan, ingest
    from clients.ray_ingest.stages import ServiceTarget

    plan = IngestPlan(sources=[corpus["folder"], corpus["manifest"]], service=ServiceTarget(address, timeout=120),
                      tritons=tritons, metadata=corpus["metadata"], batch_size=16, max_image_bytes=MAX_IMAGE_BYTES)
    return list(ingest(plan))


def all_cases(corpus) -> dict[str, Case]:
    return {c.source: c for which in ("folder", "manifest") for c in corpus["cases"][which]}


def image_encoder_calls(triton_url: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    stats = client.get_inference_statistics("coca_image_encoder", as_json=True)["model_stats"][0]
    counts = stats["inference_stats"]  # protobuf's JSON leaves out zero counts
    return int(counts["success"].get("count", 0)) + int(counts["fail"].get("count", 0))


def check_against_service(corpus, outcomes: list, address: str, reference, first_run: bool):
    """What the service holds equals what the outcomes said, and both equal the corpus's oracle."""
    cases = all_cases(corpus)
    assert sorted(o.source for o in outcomes) == sorted(cases)  # every item reported, once
    good = {c.sha256 for c in cases.values() if c.failure is None}
    by_sha: dict[str, list] = {}
    with WireClient(address, timeout=60) as client:
        for o in outcomes:
            case = cases[o.source]
            if case.failure is not None:  # failed alone, with its reason, and nothing stored for it
                assert (o.outcome, o.code) == ("failed", case.failure[0]), o
                assert case.failure[1] in o.message, o
                if case.data:
                    assert list(client.stub.FindContent(pb.FindContentRequest(content_sha256=[case.sha256])).ids) == [""]
                continue
            assert o.sha256 == case.sha256 and o.id == case.sha256[:32] and o.code == "", o
            by_sha.setdefault(o.sha256, []).append(o)
        assert set(by_sha) == good
        for sha, copies in by_sha.items():  # the same bytes: one item; added once (first run) or never
            assert {o.id for o in copies} == {sha[:32]}
            expected = Counter(added=1, duplicate=len(copies) - 1) if first_run else Counter(duplicate=len(copies))
            assert Counter(o.outcome for o in copies) == +expected, copies
            assert all(o.skipped for o in copies) or first_run
        stats = client.stats()
        assert stats.count == len(good)
        for sha, copies in by_sha.items():
            item = client.get(sha[:32], include_image=True)
            assert hashlib.sha256(item.image).hexdigest() == item.content_sha256 == sha
            added = [o for o in copies if o.outcome == "added"]
            if added:  # the first copy's uri and metadata are the item's
                assert item.uri == os.path.abspath(added[0].source) and dict(item.metadata) == cases[added[0].source].metadata
        sample = sorted(good)[:8]
        stored = np.array([client.get(sha[:32], include_embedding=True).embedding for sha in sample], np.float32)
        data = {c.sha256: c.data for c in cases.values() if c.failure is None}
        np.testing.assert_allclose(stored, reference.embed_images([data[s] for s in sample]), atol=1e-5)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("embed", ["ray", pytest.param("service", marks=pytest.mark.long)])
def test_bulk_ingest_and_resume(embed, corpus, tmp_path_factory, triton, ray_cluster, reference):
    """200 items (a folder and a manifest, one pipeline) through Ray, embedded by Ray's actor on Triton (`ray`)
    or by the service (`service`, also covered by the CLI test); then again: nothing added, every stored
    content skipped before any model call (only the failed truncated JPEG, whose header is sound, is retried)."""
    tritons = [triton] if embed == "ray" else []
    retried = sum(c.failure is not None and c.failure[1] == "truncated" for c in all_cases(corpus).values())
    with service(tmp_path_factory, triton, "--accept-embeddings") as process:
        first = run_both(corpus, process.address, tritons)
        check_against_service(corpus, first, process.address, reference, first_run=True)
        calls = image_encoder_calls(triton)
        second = run_both(corpus, process.address, tritons)
        assert image_encoder_calls(triton) == calls + retried == calls + 1
        check_against_service(corpus, second, process.address, reference, first_run=False)
        totals = Counter(o.outcome for o in second)
        assert totals["added"] == 0 and totals["failed"] == sum(c.failure is not None for c in all_cases(corpus).values())


def test_cli_ray_run_report_and_summary(corpus, trusting_service, ray_cluster, tmp_path):
    """`coca index FOLDER MANIFEST --ray ADDRESS` (the service embeds) joins the running cluster; the per-item
    report, the failure lines and the summary agree with the corpus and with what the service holds; a bad
    item makes the exit status 1. The CLI keeps the service's 32 MB limit, so the 480 kB PNG is indexed here."""
    report = tmp_path / "report.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "index", corpus["folder"], corpus["manifest"], "--ray", ray_cluster,
         "--server", trusting_service.address, "--meta", "batch=cli", "--report", str(report)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 1, result.stderr  # the sources hold bad files
    cases = all_cases(corpus)
    fails = {s: c.failure for s, c in cases.items() if c.failure and c.failure[0] != "RESOURCE_EXHAUSTED"}
    rows = {r["source"]: r for r in map(json.loads, report.read_text().splitlines())}
    assert len(rows) == 200 and {s for s, r in rows.items() if r["outcome"] == "failed"} == set(fails)
    for source, (code, words) in fails.items():
        assert rows[source]["code"] == code and f"{source}: {code}: " in result.stderr and words in rows[source]["message"]
    good = {s: c.sha256 for s, c in cases.items() if s not in fails}
    counts = Counter(rows[s]["outcome"] for s in good)
    assert counts == Counter(added=len(set(good.values())), duplicate=len(good) - len(set(good.values())))
    skipped = [s for s, r in rows.items() if r["skipped"]]  # copies whose first was stored in an earlier batch
    assert all(rows[s]["outcome"] == "duplicate" for s in skipped)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"200 items: {counts['added']} added, {counts['duplicate']} already indexed "
                              f"({len(skipped)} skipped before embedding), {len(fails)} failed"), summary
    with WireClient(trusting_service.address) as client:
        for source, sha in good.items():
            assert rows[source]["id"] == sha[:32] and client.get(sha[:32]).content_sha256 == sha


def test_cli_refuses_what_cannot_run(corpus, plain_service, triton, tmp_path, capsys):
    """Set-up errors: one line, exit 2, before any Ray or model work (the CLI in this process: no Ray starts)."""
    from clients.cli import main

    @dataclass
    class Ran:
        returncode: int
        stderr: str

    def coca_index(*args):
        code = main(["index", *args])
        return Ran(code, capsys.readouterr().err)

    refused = coca_index(corpus["folder"], "--ray", "--triton", triton, "--server", plain_service.address)
    with WireClient(plain_service.address) as client:
        assert client.stats().count == 0
    assert refused.returncode == 2 and "--accept-embeddings" in refused.stderr.strip().splitlines()[-1]
    plain = coca_index(corpus["folder"], "--writers", "2")
    assert plain.returncode == 2 and "--writers only apply with --ray" in plain.stderr
    several = coca_index(corpus["folder"], corpus["manifest"])
    assert several.returncode == 2 and "several SOURCEs only with --ray" in several.stderr
    missing = coca_index(str(tmp_path / "nowhere"), "--ray", "--server", "127.0.0.1:1")
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nowhere: no such file or directory")


# ---------------------------------------------------------------- sources
def test_sources(corpus, tmp_path, ray_cluster):
    """Directory, glob, text file and CSV manifest name the same items; bad SOURCEs are refused clearly."""
    from clients.ray_ingest.sources import resolve
    from coca.errors import InvalidInputError

    folder = Path(corpus["folder"])
    files = sorted(str(p) for p in folder.iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text("# images\n\n" + "\n".join(os.path.relpath(f, tmp_path) for f in files) + "\n")
    csv = tmp_path / "m.csv"
    csv.write_text("url,title\n" + "".join(f"{f},t{i}\n" for i, f in enumerate(files)))
    for source, expected_total in [(str(folder), 120), (str(folder / "*.*"), 120), (str(listing), 120), (str(csv), None)]:
        resolved = resolve(source)
        assert resolved.total == expected_total and (resolved.entries in (None, files)), source
    rows = resolve(str(folder)).dataset({"k": "v"}).take_all()
    assert sorted(r["source"] for r in rows) == files and {r["metadata"] for r in rows} == {'{"k": "v"}'}
    by_source = {r["source"]: json.loads(r["metadata"]) for r in resolve(str(csv)).dataset({"k": "v"}).take_all()}
    assert sorted(by_source) == files and by_source[files[3]] == {"k": "v", "title": "t3"}
    with pytest.raises(InvalidInputError, match="no such file"):
        resolve(str(tmp_path / "absent"))
    with pytest.raises(InvalidInputError, match="--path-column"):
        resolve(corpus["manifest"], path_column="file")
    other = tmp_path / "list.json"
    other.write_text("[]")
    with pytest.raises(InvalidInputError, match="not a directory, glob, text file"):
        resolve(str(other))


# ---------------------------------------------------------------- the service side
def embedding_request(data: bytes, values, repository_id: str) -> pb.AddImageRequest:
    return pb.AddImageRequest(image=data, embedding=pb.Embedding(values=values, repository_id=repository_id))


def test_precomputed_embeddings_are_refused_by_default(plain_service, reference):
    rng = np.random.default_rng(1)
    data = jpeg(rng)
    vector = reference.embed_images([data])[0]
    with WireClient(plain_service.address) as client:
        stats = client.stats()
        assert not stats.accepts_embeddings and stats.repository_id
        [result] = client.add_images([embedding_request(data, vector, stats.repository_id)])
        assert result.outcome == FAILED and result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "--accept-embeddings" in result.error.message and client.stats().count == 0


def test_precomputed_embeddings_are_checked_and_stored_as_given(trusting_service, reference):
    rng = np.random.default_rng(2)
    images = [jpeg(rng) for _ in range(7)]
    vectors = reference.embed_images(images)
    with WireClient(trusting_service.address) as client:
        stats = client.stats()
        assert stats.accepts_embeddings and stats.embedding_dim == vectors.shape[1]
        export = stats.repository_id
        nan = vectors[2].copy()
        nan[0] = np.nan
        results = list(client.add_images([
            embedding_request(images[0], vectors[0], "0" * 64),  # another export
            embedding_request(images[1], vectors[1][:-1], export),  # wrong dimension
            embedding_request(images[2], nan, export),
            embedding_request(images[3], vectors[3] * 2, export),  # not a unit vector
            embedding_request(images[4], vectors[4], export),  # taken as given
            pb.AddImageRequest(image=images[5]),  # embedded by the service, in the same stream
            embedding_request(images[4], vectors[5], export),  # known content: a duplicate, vector ignored
        ]))
        codes = [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT]
        for result, code, words in zip(results, codes, ["export", "values", "NaN", "unit"]):
            assert result.outcome == FAILED and result.error.code == code.value[0] and words in result.error.message
        assert [r.outcome for r in results[4:]] == [ADDED, ADDED, DUPLICATE]
        assert results[6].id == results[4].id
        shas = [hashlib.sha256(d).hexdigest() for d in images]
        found = client.stub.FindContent(pb.FindContentRequest(content_sha256=shas)).ids
        assert list(found) == ["", "", "", "", shas[4][:32], shas[5][:32], ""]
        for i in (4, 5):
            stored = np.asarray(client.get(shas[i][:32], include_embedding=True).embedding, np.float32)
            np.testing.assert_allclose(stored, vectors[i], atol=1e-5)
        assert client.search_image(id=shas[4][:32], k=1).hits[0].id == shas[4][:32]


def test_find_content_bounds(trusting_service):
    with WireClient(trusting_service.address) as client:
        for hashes, words in [([], "give 1..1024"), (["ab" * 32] * 1025, "give 1..1024"),
                              (["AB" * 32], "64 lowercase hex"), (["a" * 63], "64 lowercase hex")]:
            with pytest.raises(grpc.RpcError) as info:
                client.stub.FindContent(pb.FindContentRequest(content_sha256=hashes))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()


def test_ray_indexes_the_folders_videos_as_scenes_after_its_images(plain_service, ray_cluster, tmp_path):
    """`coca index FOLDER --ray`: the images go through the Ray pipeline, then the folder's videos through
    AddVideos (as plain `coca index` sends them). Oracle: the bytes written (sha256s) and the scene cut.
    Last in the module: test_cli_refuses_what_cannot_run finds plain_service empty."""
    from test_video import Clip, write_clip

    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    still = jpeg(np.random.default_rng(7))
    clip = write_clip(Clip("r", "mpeg4", "mp4", ["astronaut", "coins"], [1.0, 1.0]))
    (folder / "still.jpg").write_bytes(still)
    (folder / "sub" / "clip.mp4").write_bytes(clip)
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "index", str(folder), "--ray", ray_cluster, "--server",
         plain_service.address, "--every", "0.25", "--scene-threshold", "0.9"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "1 items: 1 added" in result.stdout and "1 videos: 1 added" in result.stdout, result.stdout
    with WireClient(plain_service.address) as client:
        sha = hashlib.sha256(still).hexdigest()
        assert client.get(sha[:32]).content_sha256 == sha
        found = client.stub.FindContent(pb.FindContentRequest(content_sha256=[hashlib.sha256(clip).hexdigest()])).ids
        assert [(s.start_s, s.end_s) for s in client.get(found[0]).video.scenes] == [(0.0, 1.0), (1.0, 2.0)]
