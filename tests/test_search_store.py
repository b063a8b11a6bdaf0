"""The search service's store and index without a model: real SQLite, real FAISS, real files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from search_service.codegen import stale_files
from search_service.config import PathRefused, resolve_under_roots
from search_service.engine import Engine, snapshot_file
from search_service.index import IndexSettings, SnapshotError, VectorIndex
from search_service.store import ConflictError, NewItem, Store, default_id, sha256_hex

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(rng, n, start=0, meta=None):
    vectors = unit(rng, n)
    return [NewItem(sha256=sha256_hex(f"content {start + i}".encode()), uri=f"mem:{start + i}",
                    embedding=vectors[i], metadata=dict(meta or {}, n=str(start + i))) for i in range(n)]


def open_engine(path, factory="Flat", **kw):
    engine = Engine(path, IndexSettings(factory=factory, **kw.pop("settings", {})), **kw)
    engine.bind_model("test-model", "random", DIM)
    engine.open_index(DIM)
    return engine


def index_ids(engine):
    return set(engine.index.ids().tolist())


def store_ids(engine):
    return {int(v) for vids, _ in engine.store.embeddings() for v in vids}


def test_generated_grpc_code_matches_the_proto():
    assert stale_files() == []


def test_add_dedup_conflict_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    engine = open_engine(tmp_path)
    batch = items(rng, 5)
    outcomes = engine.add(batch)
    assert [o.added for o in outcomes] == [True] * 5
    assert outcomes[0].id == default_id(batch[0].sha256)
    again = engine.add([NewItem(batch[2].sha256, "other", batch[2].embedding, id="my-id")])[0]
    assert not again.added and again.id == outcomes[2].id  # same content: same id, no new vector
    clash = engine.add([NewItem(sha256_hex(b"new"), "x", batch[0].embedding, id=outcomes[1].id)])[0]
    assert isinstance(clash, ConflictError) and outcomes[1].id in str(clash)
    assert engine.index.size == engine.store.count() == 5
    engine.close()

    engine = open_engine(tmp_path)
    assert engine.store.count() == 5 and index_ids(engine) == store_ids(engine)
    hit = engine.search(batch[3].embedding, 1)[0]
    assert hit.item.id == outcomes[3].id and hit.score == pytest.approx(1.0, abs=1e-5)
    assert hit.item.metadata == {"n": "3"}
    engine.close()


def test_delete_removes_row_vector_and_blob(tmp_path):
    rng = np.random.default_rng(1)
    engine = open_engine(tmp_path)
    data = b"\x89PNG not really"
    sha = sha256_hex(data)
    first = engine.add([NewItem(sha, "blob:" + sha, unit(rng, 1)[0], data=data)] + items(rng, 3))[0]
    blob = engine.get(first.id).blob
    assert (tmp_path / blob).read_bytes() == data
    removed = engine.delete(first.id)
    assert removed is not None and removed.id == first.id
    assert engine.delete(first.id) is None  # unknown now
    assert engine.store.get(first.id) is None and not (tmp_path / blob).exists()
    assert first.vid not in index_ids(engine) and engine.index.size == 3
    assert all(h.item.id != first.id for h in engine.search(unit(rng, 1)[0], 10))
    engine.close()


def test_snapshot_is_caught_up_after_a_crash(tmp_path):
    rng = np.random.default_rng(2)
    engine = open_engine(tmp_path, snapshot_every=10)
    engine.add(items(rng, 12))  # passes snapshot_every: snapshot written
    snap_seq = engine.snapshot_seq
    assert snap_seq == 12 and (tmp_path / snapshot_file("Flat")).exists()
    engine.add(items(rng, 3, start=100))
    gone = engine.store.get(default_id(sha256_hex(b"content 0")))
    engine.delete(gone.id)
    # No close(): as if the process died. The snapshot on disk is 4 changes behind.
    engine2 = open_engine(tmp_path)
    assert engine2.snapshot_seq == engine2.index.seq == 16
    assert index_ids(engine2) == store_ids(engine2) and gone.vid not in index_ids(engine2)
    assert engine2.store.changes_after(0) == []  # covered by the new snapshot, pruned
    engine2.close()


def test_unusable_snapshots_are_rebuilt(tmp_path):
    rng = np.random.default_rng(3)
    engine = open_engine(tmp_path)
    engine.add(items(rng, 7))
    engine.close()
    path = tmp_path / snapshot_file("Flat")
    path.write_bytes(path.read_bytes()[:-50])  # truncated
    engine = open_engine(tmp_path)
    assert engine.index.size == 7
    engine.close()
    # A snapshot from another store (a copied file) is refused by the store's uuid.
    other = open_engine(tmp_path / "other")
    other.add(items(rng, 2, start=50))
    other.close()
    with pytest.raises(SnapshotError, match="another store"):
        VectorIndex.load(tmp_path / "other" / snapshot_file("Flat"), IndexSettings(), Store(tmp_path).store_uuid(), DIM)
    # Another factory configured: built as that factory, in its own snapshot file.
    engine = open_engine(tmp_path, factory="HNSW16")
    assert engine.index.active == "HNSW16" and engine.index.size == 7
    engine.add(items(rng, 3, start=70))  # prunes the change log past the Flat snapshot
    engine.close()
    engine = open_engine(tmp_path)  # the Flat snapshot cannot be caught up: rebuilt, not silently stale
    assert engine.index.active == "Flat" and engine.index.size == 10
    engine.close()


def test_hnsw_deletes_are_tombstoned_then_rebuilt(tmp_path):
    rng = np.random.default_rng(4)
    engine = open_engine(tmp_path, factory="HNSW16")
    added = engine.add(items(rng, 40))
    for outcome in added[:5]:
        engine.delete(outcome.id)
    assert len(engine.index.tombstones) == 5 and engine.index.size == 35
    found = {h.item.id for h in engine.search(unit(rng, 1)[0], 40)}
    assert len(found) == 35 and not found & {o.id for o in added[:5]}
    for outcome in added[5:11]:  # the 11th passes a quarter of the 40 vectors: rebuilt without them
        engine.delete(outcome.id)
    assert engine.index.tombstones == set() and engine.index.index.ntotal == 29
    engine.close()
    engine = open_engine(tmp_path, factory="HNSW16")
    assert index_ids(engine) == store_ids(engine)
    engine.close()


def test_ivf_serves_flat_until_trained(tmp_path):
    rng = np.random.default_rng(5)
    engine = open_engine(tmp_path, factory="IVF4,Flat", settings={"nprobe": 4})
    assert engine.index.active == "Flat" and engine.index.training_needed() == 4 * 39
    engine.add(items(rng, 100))
    assert engine.index.active == "Flat"
    engine.add(items(rng, 100, start=100))
    assert engine.index.active == "IVF4,Flat" and engine.index.size == 200
    probe = engine.store.get(default_id(sha256_hex(b"content 150")), with_embedding=True)
    assert engine.search(probe.embedding, 1)[0].item.id == probe.id  # nprobe = nlist: exact
    engine.close()
    engine = open_engine(tmp_path, factory="IVF4,Flat", settings={"nprobe": 4})
    assert engine.index.active == "IVF4,Flat" and index_ids(engine) == store_ids(engine)
    engine.close()


def test_ivf_pq_trains_without_the_unused_polysemous_codes(tmp_path):
    """faiss trains IVF-PQ for polysemous filtering unless told not to; the engine never searches that way, and
    it cost 1.2 s of a 1.2 s training here (36 vectors) and 281 of 358 s for IVF64,PQ64x8 on 20k x 512. The
    trained index answers a stored vector's own query with that vector (rerank: exact scores)."""
    import faiss

    rng = np.random.default_rng(6)
    engine = open_engine(tmp_path, factory="IVF2,PQ4x4", settings={"nprobe": 2, "train_per_centroid": 2, "rerank": 4})
    engine.add(items(rng, 40))
    assert engine.index.active == "IVF2,PQ4x4"
    trained = faiss.downcast_index(engine.index.index)  # IVF keeps ids: no IDMap around it
    assert isinstance(trained, faiss.IndexIVFPQ) and not trained.do_polysemous_training
    probe = engine.store.get(default_id(sha256_hex(b"content 7")), with_embedding=True)
    hit = engine.search(probe.embedding, 1)[0]
    assert hit.item.id == probe.id and abs(hit.score - 1.0) < 1e-5
    engine.close()


@pytest.mark.parametrize("exact_limit", [0, 10_000])  # selector inside FAISS, exact scoring
def test_filters_min_score_and_k(tmp_path, exact_limit):
    rng = np.random.default_rng(6)
    engine = open_engine(tmp_path, factory="HNSW16", settings={"exact_min": exact_limit, "exact_fraction": 0.0})
    engine.add(items(rng, 30, meta={"colour": "red"}) + items(rng, 30, start=30, meta={"colour": "blue"}))
    query = unit(rng, 1)[0]
    red = engine.search(query, 50, {"colour": "red"})
    assert len(red) == 30 and all(h.item.metadata["colour"] == "red" for h in red)
    assert [h.score for h in red] == sorted((h.score for h in red), reverse=True)
    assert engine.search(query, 5, {"colour": "red", "n": "7"})[0].item.metadata["n"] == "7"
    assert engine.search(query, 5, {"colour": "green"}) == []
    everything = engine.search(query, 60)
    above = engine.search(query, 60, min_score=0.1)
    assert above == [h for h in everything if h.score >= 0.1] and 0 < len(above) < 60
    engine.close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_a_large_selection_admits_only_its_own_items(tmp_path, factory):
    """Selections of >= BITMAP_SELECTOR_MIN items go through a bitmap selector; items after the selection's
    last one must stay out (FAISS's IDSelectorBitmap takes the bitmap's size in bytes: given in bits, it
    read past the mask and let unselected items in)."""
    from search_service.index import BITMAP_SELECTOR_MIN

    rng = np.random.default_rng(11)
    chosen = BITMAP_SELECTOR_MIN + 8
    engine = open_engine(tmp_path, factory=factory, settings={"nprobe": 4})
    engine.add(items(rng, chosen, meta={"part": "first"}) + items(rng, 3000, start=chosen, meta={"part": "rest"}))
    vectors = np.stack([engine.store.get(default_id(sha256_hex(f"content {i}".encode())),
                                         with_embedding=True).embedding for i in range(chosen)])
    for query in unit(rng, 20):
        hits = engine.search(query, 10, {"part": "first"})
        want = np.argsort(-(vectors @ query), kind="stable")[:10]
        assert [h.item.uri for h in hits] == [f"mem:{i}" for i in want]
        np.testing.assert_allclose([h.score for h in hits], (vectors @ query)[want], atol=1e-5)
    engine.close()


def test_paths_are_confined_to_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"y")
    (root / "link.jpg").symlink_to(outside)
    (root / "inner.jpg").symlink_to(root / "sub" / "a.jpg")
    roots = [root]
    assert resolve_under_roots("sub/a.jpg", roots) == (root / "sub" / "a.jpg").resolve()
    assert resolve_under_roots(str(root / "inner.jpg"), roots) == (root / "sub" / "a.jpg").resolve()
    for bad, why in [("sub/../sub/a.jpg", "'..'"), (str(outside), "outside"), ("link.jpg", "outside"),
                     ("/etc/passwd", "outside")]:
        with pytest.raises(PathRefused, match=why):
            resolve_under_roots(bad, roots)
    with pytest.raises(PathRefused) as missing:
        resolve_under_roots("sub/none.jpg", roots)
    assert missing.value.not_found
    with pytest.raises(PathRefused, match="no allowed roots"):
        resolve_under_roots("sub/a.jpg", [])


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from search_service.engine import Engine
    from search_service.index import IndexSettings
    from search_service.store import NewItem, sha256_hex
    engine = Engine(sys.argv[1], IndexSettings(factory="Flat"), snapshot_every=7)
    engine.bind_model("test-model", "random", 16)
    engine.open_index(16)
    rng = np.random.default_rng(0)
    for i in range(100000):
        v = rng.standard_normal(16).astype(np.float32)
        out = engine.add([NewItem(sha256_hex(str(i).encode()), f"mem:{i}", v / np.linalg.norm(v))])[0]
        print(out.id, flush=True)  # acknowledged: committed
""")


def test_sigkill_loses_no_acknowledged_item(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 60:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    engine = open_engine(tmp_path)
    assert all(engine.store.get(i) is not None for i in acked)
    assert index_ids(engine) == store_ids(engine) and engine.index.size >= len(acked)
    engine.close()


def test_searches_run_while_items_are_added(tmp_path):
    """Readers share the index, writers exclude them: no crash, no torn result, nothing lost."""
    import threading

    rng = np.random.default_rng(7)
    engine = open_engine(tmp_path, factory="HNSW16")
    engine.add(items(rng, 50))
    queries = unit(rng, 20)
    errors, stop = [], threading.Event()

    def search_loop():
        while not stop.is_set():
            try:
                for q in queries:
                    hits = engine.search(q, 5)
                    assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            except Exception as exc:  # reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=search_loop) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(100, 400, 25):
        engine.add(items(rng, 25, start=start))
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and engine.index.size == engine.store.count() == 350
    engine.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root can mount one here and in CI); None where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path, leave: int) -> Path:
    """Fill the file system of `directory` until `leave` bytes are free."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(filler, "wb") as out:
        out.write(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_fails_the_snapshot_not_the_write(small_disk, tmp_path, monkeypatch):
    """ENOSPC while snapshotting after a committed write: the write is acknowledged, the partial .tmp removed,
    later writes do not rewrite the index each time, and the snapshot is retried once there is room."""
    import errno

    from search_service import engine as engine_module

    monkeypatch.setattr(engine_module, "SNAPSHOT_RETRY_S", (30.0, 30.0))
    rng = np.random.default_rng(8)
    data_dir = small_disk / "data" if small_disk is not None else tmp_path / "data"
    engine = open_engine(data_dir, snapshot_every=1)
    added = engine.add(items(rng, 10_000))
    calls = []
    if small_disk is not None:  # a real full disk: room for a few commits, not for a 720 kB snapshot
        filler = fill_disk(small_disk, leave=400 << 10)
    else:  # no mount allowed: the same failure, injected after a partial write
        real_save = engine.index.save

        def failing_save(path, uuid):
            (Path(path).parent / f".{Path(path).name}.tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(engine.index, "save", failing_save)
    original_snapshot = engine._snapshot
    monkeypatch.setattr(engine, "_snapshot", lambda: (calls.append(1), original_snapshot())[1])

    removed = engine.delete(added[0].id)  # committed: its answer is the item, not an internal error
    assert removed is not None and removed.id == added[0].id
    assert engine.snapshot_failures == 1 and len(calls) == 1
    assert not list(data_dir.glob(".*.tmp")), "the partial snapshot was left behind"
    for outcome in added[1:4]:
        assert engine.delete(outcome.id) is not None
    assert len(calls) == 1, "every later write tried to rewrite the whole index"

    if small_disk is not None:
        filler.unlink()
    else:
        monkeypatch.setattr(engine.index, "save", real_save)
    monkeypatch.setattr(engine, "_retry_at", 0.0)  # the backoff has passed
    assert engine.delete(added[4].id) is not None
    assert engine.snapshot_failures == 0 and engine.snapshot_seq == engine.index.seq
    engine.close()
    engine = open_engine(data_dir)
    assert all(engine.get(o.id) is None for o in added[:5]) and engine.size == 9995
    engine.close()


def test_an_add_racing_a_delete_of_the_same_content_keeps_its_bytes(tmp_path):
    """The blob of an acknowledged add is there even when a Delete of the same content ran meanwhile."""
    import threading

    rng = np.random.default_rng(9)
    engine = open_engine(tmp_path)
    data = b"the same bytes, added and deleted concurrently"
    sha = sha256_hex(data)
    vector = unit(rng, 1)[0]
    lost = []
    for _ in range(150):
        engine.add([NewItem(sha, "mem:x", vector, data=data)])
        start = threading.Barrier(2)

        def add():
            start.wait()
            engine.add([NewItem(sha, "mem:x", vector, data=data)])

        def delete():
            start.wait()
            engine.delete(default_id(sha))

        threads = [threading.Thread(target=add), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        item = engine.get(default_id(sha))
        if item is not None and not (tmp_path / item.blob).is_file():
            lost.append(item.vid)
        engine.delete(default_id(sha))
    assert lost == [], f"{len(lost)} acknowledged adds have no image file"
    assert not list((tmp_path / "blobs").glob("??/*")), "orphan blobs"
    engine.close()


def test_refused_adds_leave_no_blob_and_crash_leftovers_are_swept(tmp_path):
    rng = np.random.default_rng(10)
    engine = open_engine(tmp_path)
    [first] = engine.add([NewItem(sha256_hex(b"a"), "mem:a", unit(rng, 1)[0], id="taken", data=b"a")])
    for i in range(20):  # an id conflict, again and again: no file may stay behind
        data = f"other {i}".encode()
        [clash] = engine.add([NewItem(sha256_hex(data), "mem:b", unit(rng, 1)[0], id="taken", data=data)])
        assert isinstance(clash, ConflictError)
    assert {p.name for p in (tmp_path / "blobs").glob("??/*")} == {first.sha256}
    assert not list(engine.store.blobs.staging.iterdir())
    engine.close()
    orphan = tmp_path / "blobs" / "ff" / ("ff" * 32)  # as after a crash between rename and commit
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody")
    (tmp_path / "blobs" / ".staging" / "x.tmp").write_bytes(b"half")
    engine = open_engine(tmp_path)
    assert not orphan.exists() and not list(engine.store.blobs.staging.iterdir())
    assert engine.read_image(engine.get("taken")) == b"a"
    engine.close()


def bm25_oracle(query: str, documents: dict[str, str]) -> dict[str, float]:
    """FTS5's bm25() (k1 1.2, b 0.75, idf floored at 1e-6), positive, over `documents` (id -> text): the test's own."""
    split = lambda text: "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()
    docs = {i: split(text) for i, text in documents.items() if split(text)}
    average = sum(map(len, docs.values())) / len(docs)
    scores = {}
    for i, words in docs.items():
        total, found = 0.0, False
        for word in dict.fromkeys(split(query)):
            having = sum(word in d for d in docs.values())
            idf = max(np.log((len(docs) - having + 0.5) / (having + 0.5)), 1e-6)
            tf = words.count(word)
            found |= tf > 0
            total += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(words) / average))
        if found:
            scores[i] = total
    return scores


def assert_keyword_hits(hits, query: str, documents: dict[str, str], among=None) -> None:
    """Hits are the oracle's documents holding a word of `query` (those in `among`), best first (equal scores in
    any order: the service orders ties by id)."""
    scores = bm25_oracle(query, documents)
    expected = sorted((i for i in scores if among is None or i in among), key=lambda i: (-scores[i], i))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True), query
    assert [h.item.id for h in sorted(hits, key=lambda h: (-h.score, h.item.id))] == expected, query
    np.testing.assert_allclose([h.score for h in hits], [scores[i] for i in expected], rtol=1e-9)


def test_keyword_index_follows_captions_and_a_version_2_store_is_migrated(tmp_path):
    """The keyword index holds exactly the live captions (set, replaced, deleted), scored by BM25 (the test's own),
    and a store written with schema version 2 (an FTS5 table over captions, its triggers) opens with the table
    dropped and its captions found."""
    import sqlite3

    rng = np.random.default_rng(5)
    engine = open_engine(tmp_path, snapshot_every=10_000)
    added = engine.add(items(rng, 5, meta={"album": "a"}))
    ids = [o.id for o in added]
    engine.set_captions({ids[0]: "a red cat", ids[1]: "a cat on a cat", ids[2]: "a dog", ids[3]: "Red bus"})
    engine.set_captions({ids[2]: "a red dog"})
    engine.delete(ids[1])
    captions = {ids[0]: "a red cat", ids[2]: "a red dog", ids[3]: "Red bus"}
    for query in ["RED cat!", "a", "bus dog", "cat cat"]:
        assert_keyword_hits(engine.keyword_search(query, 10), query, captions)
    assert [h.item.id for h in engine.keyword_search("red", 1)] == [ids[3]]  # the shortest caption: the best
    assert engine.keyword_search('" OR *', 10) == [] and engine.keyword_search("cat", 10, {"album": "b"}) == []
    engine.close()
    # Back to version 2: caption_text (FTS5, external content) over captions and its triggers; a caption stored then.
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    db.executescript("""
        UPDATE info SET value = '2' WHERE key = 'schema_version';
        CREATE VIRTUAL TABLE caption_text USING fts5(caption, content='items', content_rowid='vid');
        INSERT INTO caption_text (caption_text) VALUES ('rebuild');
        CREATE TRIGGER caption_text_add AFTER INSERT ON items WHEN new.caption IS NOT NULL BEGIN
            INSERT INTO caption_text (rowid, caption) VALUES (new.vid, new.caption);
        END;""")
    db.execute("UPDATE items SET caption = 'a blue whale' WHERE id = ?", (ids[4],))
    db.commit()
    db.close()
    engine = open_engine(tmp_path, snapshot_every=10_000)
    captions[ids[4]] = "a blue whale"
    for query in ["whale", "red a"]:
        assert_keyword_hits(engine.keyword_search(query, 10), query, captions)
    assert Store(tmp_path).info()["schema_version"] == "3"
    tables = {name for (name,) in engine.store._reader().execute("SELECT name FROM sqlite_master")}
    assert not any(t.startswith("caption_text") for t in tables), tables
    engine.delete(ids[4])
    assert engine.keyword_search("whale", 10) == []
    engine.close()


def test_keyword_search_reads_the_text_fields_the_schema_declares(tmp_path):
    """KEYWORD hits are the live items whose caption or declared text fields hold a word of the query, by BM25
    over caption + text fields (the test's own oracle), through adds, captions, re-captions and deletes, with a
    filter, and again after the schema declares other text fields."""
    from search_service.query import Schema

    rng = np.random.default_rng(8)
    vocabulary = ["red", "barn", "lake", "owl", "snow", "bridge", "dusk", "fox"]
    words = lambda n: " ".join(rng.choice(vocabulary, n).tolist())
    schema = Schema({"title": "text", "notes": "text", "year": "number"})
    engine = open_engine(tmp_path, snapshot_every=10_000, schema=schema)
    new = items(rng, 40)
    for item in new:
        item.metadata.update({"title": words(2), "notes": words(3), "album": words(1), "year": "2020"})
    ids = [o.id for o in engine.add(new)]
    engine.set_captions({ids[i]: words(4) for i in range(0, 40, 3)})
    engine.set_captions({ids[i]: words(2) for i in range(0, 40, 6)})  # new captions replace the old
    for gone in ids[5:9] + [ids[12]]:
        engine.delete(gone)
    silent = [o.id for o in engine.add(items(rng, 3, start=100))]  # no caption, no text field: not a document
    engine.set_captions({silent[0]: "a lone owl"})
    ids += silent

    def documents(fields):
        live = [engine.get(i) for i in ids if engine.get(i) is not None]
        return {item.id: " ".join([item.caption or "", *(item.metadata.get(f, "") for f in fields)]) for item in live}

    for query in ["owl", "Snow, DUSK", "fox bridge barn", "album", "2020", "lone"]:
        assert_keyword_hits(engine.keyword_search(query, 100), query, documents(["notes", "title"]))
    with_year = {i for i in ids[:40] if engine.get(i) is not None}
    assert_keyword_hits(engine.keyword_search("owl lake", 100, {"year": "2020"}), "owl lake",
                        documents(["notes", "title"]), among=with_year)
    assert len(engine.keyword_search("owl lake", 5)) == 5
    engine.close()
    # Another schema: album is now the only text field (title and notes are no longer read).
    engine = open_engine(tmp_path, snapshot_every=10_000, schema=Schema({"album": "text"}))
    for query in ["owl", "lake red"]:
        assert_keyword_hits(engine.keyword_search(query, 100), query, documents(["album"]))
    engine.close()


@pytest.mark.parametrize("durable", [False, True])
def test_caption_retry_job_backs_off_gives_up_waits_when_paused_and_survives_a_reopen(tmp_path, durable):
    """The retry job over each book (in memory; the embedded store's SQLite): a caption that keeps failing
    is tried `retries` times, each wait twice the one before, then given up; one that fails once is made
    at its second try; a Paused try (Triton down or busy) costs no try; captions stored by other means,
    and deleted items, leave the book. The durable book still holds what is pending after a reopen."""
    import asyncio
    import time

    from search_service.caption_retry import CaptionRetryJob, MemoryRetryBook, Paused, RetryPolicy

    engine = open_engine(tmp_path / "data")
    ids = [o.id for o in engine.add(items(np.random.default_rng(0), 5))]
    book = engine.retry_book if durable else MemoryRetryBook()
    assert book.durable is durable
    policy = RetryPolicy(retries=3, first_wait_s=0.02, rate=1000)
    tries: dict[str, list[float]] = {i: [] for i in ids}
    plan = {ids[0]: ["fail", "ok"], ids[1]: ["fail"] * 5, ids[2]: ["pause", "pause", "ok"]}

    async def caption_item(item_id):  # as the service's: an item gone or captioned meanwhile needs none
        item = engine.get(item_id)
        if item is None or item.caption:
            return False
        tries[item_id].append(time.monotonic())
        outcome = plan[item_id][len(tries[item_id]) - 1]
        if outcome == "pause":
            raise Paused("Triton busy")
        if outcome == "fail":
            raise RuntimeError("decode step failed")
        engine.set_captions({item_id: "a caption"})
        return True

    job = CaptionRetryJob(book, policy, caption_item)
    job.record_failures({i: "decoder cache full" for i in ids})
    assert job.stats() == {"captions_pending_retry": 5, "captions_retried_ok": 0, "captions_given_up": 0}
    engine.set_captions({ids[3]: "made by a search"})  # no retry needed any more
    engine.delete(ids[4])
    if durable:
        engine.close()
        engine = open_engine(tmp_path / "data")
        book = job.book = engine.retry_book
        assert book.counts() == (3, 0)

    async def run_until_settled():
        task = asyncio.create_task(job.run())
        deadline = time.monotonic() + 20
        while job.stats()["captions_pending_retry"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(run_until_settled())
    assert job.stats() == {"captions_pending_retry": 0, "captions_retried_ok": 2, "captions_given_up": 1}
    assert [len(tries[i]) for i in ids[:3]] == [2, 3, 3] and tries[ids[3]] == tries[ids[4]] == []
    waits = np.diff(tries[ids[1]])  # after retry 1 fails: 2 x first_wait_s; after retry 2: 4 x
    assert waits[0] >= 2 * policy.first_wait_s * 0.9 and waits[1] >= 4 * policy.first_wait_s * 0.9, waits
    if durable:
        assert engine.get(ids[0]).caption == engine.get(ids[2]).caption == "a caption"
    engine.close()
