"""Search inside videos (README "Video"): synthetic videos made here with PyAV, each a few scenes of distinct
pictures with known cut times, indexed through a real service over a real Triton (the tiny model).

Oracles: the cut times the videos were written with; the in-process model (coca-tiny, the weights Triton
serves) for captions and embeddings; what the service said it stored for deletes and kills."""
from __future__ import annotations

import io
import re
import sqlite3
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from search_service.pb import search_pb2 as pb
from search_service.testing import ServiceProcess, WireClient

EVERY_S = 0.25  # sampling interval the tests ask for: cuts must land within one of it
THRESHOLD = 0.9  # cut below this cosine: the pictures below are further apart than this under coca-tiny
OPTIONS = pb.VideoOptions(every_s=EVERY_S, scene_threshold=THRESHOLD, min_scene_s=0.5, max_scene_s=30)
SIZE = (96, 64)
MAX_TOKENS = 6  # captions of coca-tiny (random weights) run to the limit: keep them short


@dataclass
class Clip:
    name: str
    codec: str
    container: str
    pictures: list[str]  # skimage sample names, one per scene
    seconds: list[float]  # each scene's length
    fps: float = 10
    variable_rate: bool = False  # frame intervals alternate 1/fps and 3/fps
    size: tuple[int, int] = SIZE

    @property
    def cuts(self) -> list[float]:
        return list(np.cumsum([0.0] + self.seconds))  # start of each scene, then the end

    @property
    def duration(self) -> float:
        return self.cuts[-1]


CLIPS = [
    Clip("a", "mpeg4", "mp4", ["astronaut", "coffee", "rocket"], [2.0, 1.5, 2.5], fps=10),
    Clip("b", "libx264", "matroska", ["camera", "moon", "page", "hubble_deep_field"], [1.5, 2.0, 1.0, 2.0], fps=25),
    Clip("c", "libvpx-vp9", "webm", ["immunohistochemistry", "coins", "logo"], [2.0, 1.5, 2.0], fps=20,
         variable_rate=True),
]


def picture(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(SIZE)


def frame_times(clip: Clip) -> list[float]:
    times, t, step = [], 0.0, 0
    while t < clip.duration - 1e-9:
        times.append(t)
        t += (1 if not clip.variable_rate or step % 2 == 0 else 3) / clip.fps
        step += 1
    return times


def write_clip(clip: Clip) -> bytes:
    import av

    out = io.BytesIO()
    pictures = [picture(n).resize(clip.size) for n in clip.pictures]
    with av.open(out, "w", format=clip.container) as container:
        stream = container.add_stream(clip.codec, rate=int(clip.fps))
        stream.width, stream.height, stream.pix_fmt = *clip.size, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for t in frame_times(clip):
            scene = int(np.searchsorted(clip.cuts, t + 1e-9, side="right")) - 1
            frame = av.VideoFrame.from_image(pictures[scene])
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def triton(plain_triton):
    return plain_triton.grpc_url


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {clip.name: write_clip(clip) for clip in CLIPS}


@pytest.fixture(scope="module")
def service(tmp_path_factory, triton, tiny_repository):
    with ServiceProcess(tmp_path_factory.mktemp("video-data"), triton, "--logit-scale", str(tiny_repository[1])
                        ) as process:
        yield process


@pytest.fixture(scope="module")
def client(service):
    with WireClient(service.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def indexed(client, clips) -> dict[str, pb.AddVideoResult]:
    """The three clips, captioned, added in one stream with a truncated file between them."""
    truncated = clips["a"][: len(clips["a"]) * 6 // 10]
    requests = [pb.AddVideoRequest(video=clips["a"], uri="a.mp4", options=_captioned()),
                pb.AddVideoRequest(video=truncated, uri="cut.mp4", options=_captioned()),
                pb.AddVideoRequest(video=clips["b"], uri="b.mkv", metadata={"source": "test"}, options=_captioned()),
                pb.AddVideoRequest(video=clips["c"], uri="c.webm", options=_captioned())]
    results = list(client.add_videos(requests))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[1].outcome == pb.AddImageResult.FAILED, results[1]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a video" in results[1].error.message
    by_name = {"a": results[0], "b": results[2], "c": results[3]}
    for name, result in by_name.items():
        assert result.outcome == pb.AddImageResult.ADDED, (name, result)
    return by_name


def _captioned() -> pb.VideoOptions:
    options = pb.VideoOptions()
    options.CopyFrom(OPTIONS)
    options.caption = True
    options.sampling.max_tokens = MAX_TOKENS
    return options


# ---------------------------------------------------------------- cutting, searching, captions
def test_the_pictures_are_apart_under_the_model(tiny_coca):
    """The premise of the cut oracle: consecutive scenes' pictures are below the threshold, each picture is
    nearer itself than any other by a margin (computed in process, the weights Triton serves)."""
    for clip in CLIPS:
        vectors = np.asarray(tiny_coca.embed_images([picture(n) for n in clip.pictures]))
        consecutive = (vectors[1:] * vectors[:-1]).sum(1)
        assert (consecutive < THRESHOLD - 0.05).all(), (clip.name, consecutive)


@pytest.mark.parametrize("clip", CLIPS, ids=[c.name for c in CLIPS])
def test_cuts_land_within_one_sample_of_the_truth(indexed, clip):
    video = indexed[clip.name].video
    assert len(video.scenes) == len(clip.pictures)
    starts = [s.start_s for s in video.scenes]
    ends = [s.end_s for s in video.scenes]
    assert np.allclose(starts, clip.cuts[:-1], atol=EVERY_S + 1e-6), (starts, clip.cuts)
    assert ends[:-1] == starts[1:]  # scenes tile the video
    assert abs(ends[-1] - clip.duration) <= 3 / clip.fps + 1e-6 and abs(video.duration_s - ends[-1]) < 1e-6
    assert [s.index for s in video.scenes] == list(range(len(clip.pictures)))


@pytest.mark.parametrize("clip", CLIPS, ids=[c.name for c in CLIPS])
def test_a_frame_of_scene_j_finds_scene_j_first_with_its_times(client, indexed, clip):
    video = indexed[clip.name]
    for j, name in enumerate(clip.pictures):
        hit = client.search_image(png(picture(name)), k=3).hits[0]
        scene = video.video.scenes[j]
        assert (hit.id, hit.video_id) == (scene.id, video.id), (clip.name, j, [h.id for h in client.search_image(
            png(picture(name)), k=3).hits])
        assert (hit.start_s, hit.end_s) == (scene.start_s, scene.end_s)
        assert abs(hit.start_s - clip.cuts[j]) <= EVERY_S + 1e-6
        assert hit.caption == scene.caption != ""


def test_scene_captions_are_the_in_process_video_caption_of_the_same_frames(indexed, clips, tiny_coca):
    """The card's video caption (mean of the frames' ImageEmbeddings) of each scene's sampled frames, in process."""
    from coca import media
    from coca.settings import SamplingParams

    for clip in CLIPS[:1]:  # in-process generation is slow (no KV cache): one video's scenes
        frames = list(media.sample_frames(clips[clip.name], EVERY_S))
        for scene in indexed[clip.name].video.scenes:
            chosen = [f.image for f in frames if scene.start_s <= f.time_s < scene.end_s]
            embeddings = tiny_coca.encode_images(chosen).image_embeddings.mean(0, keepdim=True)
            expected = tiny_coca.caption_embeddings(embeddings, SamplingParams(max_tokens=MAX_TOKENS))[0]
            assert scene.caption == expected.text and len(expected.tokens) > 2, (clip.name, scene.index)


def test_scene_embedding_is_the_normalised_mean_of_its_frames(client, indexed, clips, tiny_coca):
    from coca import media

    clip = CLIPS[0]
    frames = list(media.sample_frames(clips[clip.name], EVERY_S))
    for scene in indexed[clip.name].video.scenes:
        vectors = np.asarray(tiny_coca.embed_images([f.image for f in frames if scene.start_s <= f.time_s < scene.end_s]))
        mean = vectors.mean(0)
        stored = np.asarray(client.get(scene.id, include_embedding=True).embedding)
        assert np.allclose(stored, mean / np.linalg.norm(mean), atol=2e-4)


def test_text_search_answers_scenes_and_groups_by_video(client, indexed):
    hits = client.search_text("a photo", k=50).hits
    assert len(hits) == 10 and all(h.video_id for h in hits)
    grouped = _search(client, "a photo", k=2, group_by_video=True)
    best = {}
    for h in hits:  # the oracle: each video's best scene of the full ranking, in ranking order
        best.setdefault(h.video_id, h.id)
    assert [h.id for h in grouped.hits] == list(best.values())[:2]
    rest = _search(client, "a photo", k=2, group_by_video=True, page_token=grouped.next_page_token)
    assert [h.id for h in rest.hits] == list(best.values())[2:] and not rest.next_page_token


def test_conditions_on_video_fields(client, indexed):
    starts = {s.id: s.start_s for r in indexed.values() for s in r.video.scenes}
    where = [pb.Condition(field="start_s", range=pb.Range(gte="1.9"))]
    found = {h.id for h in _search(client, "a photo", k=50, where=where).hits}
    assert found == {i for i, start in starts.items() if start >= 1.9}
    longer = [pb.Condition(field="video_duration_s", range=pb.Range(gt="6.2"))]
    assert {h.video_id for h in _search(client, "a photo", k=50, where=longer).hits} == {indexed["b"].id}
    assert {h.video_id for h in _search(client, "x", k=50, filters={"source": "test"}).hits} == {indexed["b"].id}


def test_get_lists_the_scenes_and_a_scene_gives_its_keyframe(client, indexed):
    video = indexed["a"]
    got = client.get(video.id)
    assert got.video.scenes == video.video.scenes and got.content_sha256 == video.content_sha256
    scene = client.get(video.video.scenes[1].id, include_image=True)
    assert scene.scene.video_id == video.id and scene.scene.start_s == video.video.scenes[1].start_s
    keyframe = Image.open(io.BytesIO(scene.image))
    assert keyframe.format == "JPEG" and max(keyframe.size) <= 320


# ---------------------------------------------------------------- the web gallery plays scenes
@pytest.fixture(scope="module")
def gallery(service):
    from clients.coca_client import Client
    from clients.web.server import start_gallery

    with Client(service.address, timeout=60) as client:
        server = start_gallery(0, client)
        try:
            yield server
        finally:
            server.stop()


def _http(gallery, path: str, headers: dict = {}) -> tuple[int, dict, bytes]:
    import http.client

    port = gallery.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"127.0.0.1:{port}", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("name, media_type", [("a", "video/mp4"), ("b", "video/x-matroska"), ("c", "video/webm")])
def test_the_gallery_serves_a_video_by_ranges_of_the_bytes_sent(gallery, indexed, clips, monkeypatch, name,
                                                                media_type):
    """Oracle: the bytes sent at ingest. Ranges answer 206 with exactly their slice (cut at MAX_RANGE_BYTES),
    no Range the whole video (200, streamed a slice at a time); a range outside it 416, one that does not parse 400."""
    from clients.web import server

    data, path = clips[name], f"/video/{indexed[name].id}"
    total = len(data)
    monkeypatch.setattr(server, "MAX_RANGE_BYTES", 1000)  # several slices per clip
    for header, first, last in [("bytes=10-99", 10, 99), ("bytes=0-0", 0, 0), ("bytes=-50", total - 50, total - 1),
                                (f"bytes={total - 7}-", total - 7, total - 1), ("bytes=0-", 0, 999),
                                (f"bytes=500-{total + 10**9}", 500, 1499), (f"bytes=-{total + 5}", 0, 999)]:
        status, headers, body = _http(gallery, path, {"Range": header})
        assert status == 206 and body == data[first:last + 1], (header, status, body[:200])
        assert headers["Content-Range"] == f"bytes {first}-{last}/{total}" and headers["Content-Type"] == media_type
        assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = _http(gallery, path)
    assert status == 200 and body == data and int(headers["Content-Length"]) == total
    for header in (f"bytes={total}-", f"bytes={total + 1}-{total + 9}", "bytes=50-10", "bytes=-0"):
        status, headers, body = _http(gallery, path, {"Range": header})
        assert status == 416 and headers["Content-Range"] == f"bytes */{total}", (header, status, body)
    for header in ("bytes=0-1,5-9", "items=0-9", "bytes=abc", "bytes=-", "bytes=0x10-"):
        status, _, body = _http(gallery, path, {"Range": header})
        assert status == 400 and b"Range must be one range" in body, (header, status, body)


def test_the_gallery_reads_videos_by_id_only_under_its_origin_checks(gallery, indexed):
    """Never a path: a scene's id, an unknown id or a path-like one is 404; a foreign Host 421, another site 403."""
    video = indexed["a"]
    for path in (f"/video/{video.video.scenes[0].id}", "/video/nope", "/video/..%2F..%2Fetc%2Fpasswd",
                 "/video/%2Fetc%2Fpasswd", "/video/"):
        status, _, body = _http(gallery, path, {"Range": "bytes=0-9"})
        assert status == 404, (path, status, body)
    assert _http(gallery, f"/video/{video.id}", {"Host": "attacker.example"})[0] == 421
    for headers in ({"Origin": "http://attacker.example"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
                    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}):
        assert _http(gallery, f"/video/{video.id}", headers)[0] == 403, headers


def test_read_video_is_bounded_and_names_what_is_wrong(service, indexed, clips):
    from clients.coca_client import Client, InvalidArgument, NotFound

    video_id, data = indexed["b"].id, clips["b"]
    with Client(service.address) as python:
        piece = python.read_video(video_id, 7, 300)
        assert (piece.data, piece.offset, piece.total_bytes) == (data[7:307], 7, len(data))
        assert python.read_video(video_id, len(data) - 3).data == data[-3:]  # fewer at the end
        for offset, length, code, words in [(0, 0, "INVALID_ARGUMENT", "length must be 1 to 4194304"),
                                            (0, (4 << 20) + 1, "INVALID_ARGUMENT", "length must be 1 to 4194304"),
                                            (len(data), 10, "OUT_OF_RANGE", "at or past the video's end")]:
            with pytest.raises(InvalidArgument) as caught:
                python.read_video(video_id, offset, length)
            assert caught.value.code.name == code and words in caught.value.details, caught.value
        with pytest.raises(NotFound, match="no video with id"):
            python.read_video(indexed["b"].video.scenes[0].id, 0, 10)


def test_the_gallery_api_gives_scene_hits_their_player_and_a_video_its_strip(gallery, client, indexed):
    """Oracle: the Python client's hits and Get of the video."""
    import json
    import urllib.parse

    status, _, body = _http(gallery, "/api/search?q=a+photo&k=12")
    hits = json.loads(body)["hits"]
    expected = client.search_text("a photo", k=12).hits
    assert status == 200 and [h["id"] for h in hits] == [h.id for h in expected]
    for shown, hit in zip(hits, expected):
        scene = shown["scene"]
        assert (scene["video_id"], scene["start_s"], scene["end_s"]) == (hit.video_id, hit.start_s, hit.end_s)
        assert scene["src"] == f"/video/{urllib.parse.quote(hit.video_id, safe='')}#t={hit.start_s:.3f},{hit.end_s:.3f}"
    video = indexed["c"]
    status, _, body = _http(gallery, f"/api/video?id={video.id}")
    strip = json.loads(body)
    assert status == 200 and strip["duration_s"] == pytest.approx(client.get(video.id).video.duration_s)
    assert [(s["id"], s["index"], s["start_s"], s["end_s"], s["caption"]) for s in strip["scenes"]] == \
        [(s.id, s.index, s.start_s, s.end_s, s.caption) for s in video.video.scenes]
    status, headers, thumb = _http(gallery, strip["scenes"][1]["thumb"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(thumb)).format == "JPEG"
    assert _http(gallery, f"/api/video?id={video.video.scenes[0].id}")[0] == 404  # a scene is not a video


def test_the_gallery_plays_a_scene_hit_from_its_start_in_a_browser(gallery, client, indexed, browser):
    """Headless Chromium: a text search shows the Python client's hits as players of their scenes; the WebM
    clip's player loads over range requests and stands at its scene's start (the media fragment); its video's
    scene strip shows every scene's keyframe and times, and a keyframe seeks the strip's player there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    cards = lambda: browser.find_elements(By.CSS_SELECTOR, "#results .card")
    expected = client.search_text("a photo", k=12).hits
    browser.get(gallery.url)
    browser.find_element(By.ID, "query").send_keys("a photo", Keys.ENTER)
    wait.until(lambda b: len(cards()) == len(expected))
    assert [c.get_attribute("data-id") for c in cards()] == [h.id for h in expected]
    webm = indexed["c"].id
    for card, hit in zip(cards(), expected):
        player = card.find_element(By.CSS_SELECTOR, "video.thumb")
        assert player.get_attribute("src").endswith(f"/video/{hit.video_id}#t={hit.start_s:.3f},{hit.end_s:.3f}")
    card, hit = next((c, h) for c, h in zip(cards(), expected) if h.video_id == webm and h.start_s > 0)
    player = card.find_element(By.CSS_SELECTOR, "video.thumb")
    wait.until(lambda b: b.execute_script("return arguments[0].readyState", player) >= 1)
    assert browser.execute_script("return arguments[0].currentTime", player) == pytest.approx(hit.start_s, abs=0.06)
    assert browser.execute_script("return arguments[0].error", player) is None

    card.find_element(By.CSS_SELECTOR, ".scenes").click()
    strip = lambda: browser.find_elements(By.CSS_SELECTOR, "#strip-scenes li")
    scenes = indexed["c"].video.scenes
    wait.until(lambda b: len(strip()) == len(scenes))
    assert [li.text for li in strip()] == [f"0:{s.start_s:04.1f}–0:{s.end_s:04.1f}" for s in scenes]
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                             for i in b.find_elements(By.CSS_SELECTOR, "#strip-scenes img")))
    strip()[2].click()
    player = browser.find_element(By.ID, "strip-player")
    wait.until(lambda b: abs(b.execute_script("return arguments[0].currentTime", player) - scenes[2].start_s) < 0.3)


def test_the_async_and_node_clients_add_videos_and_read_them_back(service, client, indexed, clips, tmp_path,
                                                                  request):
    """AsyncClient.add_videos and Node's addVideos send videos as the sync client does. Oracles: the scenes the
    service lists for the video (Get), and the bytes sent (ReadVideo through each client)."""
    import asyncio
    import base64
    import hashlib
    import json
    import shutil
    import subprocess

    from clients.coca_client import AsyncClient, Outcome, video_options

    fresh = write_clip(Clip("f", "mpeg4", "mp4", ["brick", "coins"], [1.0, 1.0]))
    options = video_options(every_s=EVERY_S, scene_threshold=THRESHOLD, min_scene_s=0.5)

    async def add_async():
        async with AsyncClient(service.address, timeout=120) as python:
            added = [r async for r in python.add_videos([fresh, clips["a"]], {"by": "async"}, options=options)]
            return added, await python.read_video(added[0].id, 100, 200)

    (added, again), piece = asyncio.run(add_async())
    request.addfinalizer(lambda: client.delete(added.id))  # the later tests count the module's videos
    assert added.outcome is Outcome.ADDED and added.content_sha256 == hashlib.sha256(fresh).hexdigest()
    assert again.outcome is Outcome.DUPLICATE and again.id == indexed["a"].id
    stored = client.get(added.id)
    assert [(s.id, s.start_s, s.end_s) for s in stored.video.scenes] == \
        [(s.id, s.start_s, s.end_s) for s in added.video.scenes] and len(added.video.scenes) == 2
    assert client.get(added.video.scenes[0].id).metadata["by"] == "async"
    assert (piece.data, piece.total_bytes, piece.content_type) == (fresh[100:300], len(fresh), "video/mp4")

    if shutil.which("node") is None:
        pytest.skip("node is not installed (the Node.js client needs Node >= 18)")
    node_clip = write_clip(Clip("g", "libvpx-vp9", "webm", ["rocket", "moon"], [1.0, 1.5], fps=20))
    (tmp_path / "g.webm").write_bytes(node_clip)
    node_options = {"everyS": EVERY_S, "sceneThreshold": THRESHOLD, "minSceneS": 0.5}
    calls = [{"call": "addVideos", "args": [[{"file": str(tmp_path / "g.webm"), "uri": "g.webm", "metadata": {"by": "node"},
                                             "options": node_options}, {"video": "", "options": node_options}]]},
             {"call": "addVideos", "args": [[{"file": str(tmp_path / "g.webm"), "options": {"everyS": 0.01}}]]},
             {"call": "addVideos", "args": [[{"file": str(tmp_path / "g.webm"), "options": {"every": 1}}]]}]
    node = ["node", str(Path(__file__).parent / "node" / "answers.js"), service.address]
    done = subprocess.run([*node, json.dumps(calls)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (node_added, empty), (too_often,), bad_option = json.loads(done.stdout)
    request.addfinalizer(lambda: client.delete(node_added["id"]))
    assert node_added["outcome"] == "ADDED" and node_added["content_sha256"] == hashlib.sha256(node_clip).hexdigest()
    stored = client.get(node_added["id"])
    assert [(s["id"], s["start_s"], s["end_s"]) for s in node_added["video"]["scenes"]] == \
        [(s.id, s.start_s, s.end_s) for s in stored.video.scenes] and len(stored.video.scenes) == 2
    assert stored.uri == "g.webm" and client.get(stored.video.scenes[1].id).metadata["by"] == "node"
    assert empty["outcome"] == "FAILED" and "empty video" in empty["error"]["message"]
    assert too_often["outcome"] == "FAILED" and "every_s" in too_often["error"]["message"]
    assert "unknown video option every" in bad_option["error"]
    calls = [{"call": "readVideo", "args": [node_added["id"], 50, 70]},
             {"call": "readVideo", "args": [node_added["id"], len(node_clip), 10]}]
    done = subprocess.run([*node, json.dumps(calls)], capture_output=True, text=True, timeout=120)
    piece, past = json.loads(done.stdout)
    assert base64.b64decode(piece["data"]) == node_clip[50:120] and piece["total_bytes"] == len(node_clip)
    assert piece["content_type"] == "video/webm" and past["code"] == "OUT_OF_RANGE"


def test_a_search_captions_an_uncaptioned_scene_from_its_frames_like_ingest(service, client, tiny_coca, request):
    """A scene stored without a caption, captioned by a `with_captions` search: from the mean ImageEmbeddings of
    its sampled frames decoded again from the stored video (seeking to the scene), not from its keyframe.
    Oracle: the in-process video caption of the same frames (the service's default sampling)."""
    from coca import media
    from coca.settings import SamplingParams

    data = write_clip(Clip("h", "libvpx-vp9", "webm", ["coffee", "rocket", "camera"], [1.0, 1.5, 1.0], fps=20,
                           variable_rate=True))
    (added,) = client.add_videos([pb.AddVideoRequest(video=data, uri="h.webm", options=OPTIONS)])
    request.addfinalizer(lambda: client.delete(added.id))  # the later tests count the module's videos
    assert len(added.video.scenes) == 3 and not any(s.caption for s in added.video.scenes)
    hits = _search(client, "a photo", k=3, filters={"video_id": added.id}, with_captions=True).hits
    captions = {h.id: h.caption for h in hits}
    frames = list(media.sample_frames(data, EVERY_S))
    for scene in added.video.scenes:
        chosen = [f.image for f in frames if scene.start_s - 5e-4 <= f.time_s < scene.end_s - 5e-4]
        embeddings = tiny_coca.encode_images(chosen).image_embeddings.mean(0, keepdim=True)
        expected = tiny_coca.caption_embeddings(embeddings, SamplingParams())[0]
        assert captions[scene.id] == expected.text and len(expected.tokens) > 2, scene.index
        assert client.get(scene.id).caption == expected.text  # stored


def test_the_same_video_twice_adds_nothing(client, indexed, clips):
    before = client.stats().count
    (again,) = client.add_videos([pb.AddVideoRequest(video=clips["a"], options=OPTIONS)])
    assert again.outcome == pb.AddImageResult.DUPLICATE and again.id == indexed["a"].id
    assert [s.id for s in again.video.scenes] == [s.id for s in indexed["a"].video.scenes]
    assert client.stats().count == before


def test_a_reindex_of_a_store_with_videos_is_refused_naming_them(client, indexed):
    """A reindex embeds items from their stored image; a scene's embedding is its frames' mean (not built for a
    reindex): START is FAILED_PRECONDITION naming the videos, and the store is left as it was."""
    before = client.stats()
    request = pb.ReindexRequest(action=pb.ReindexRequest.START, to_model="coca-tiny", to_pretrained="random",
                                triton="127.0.0.1:1")
    with pytest.raises(grpc.RpcError) as refused:
        list(client.stub.Reindex(request, timeout=60, metadata=client.metadata))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert f"the store holds {len(indexed)} videos" in refused.value.details(), refused.value.details()
    after = client.stats()
    assert (after.count, after.generation) == (before.count, before.generation)


def test_limits_are_refused_by_name(tmp_path, triton, tiny_repository, clips):
    """Each limit passed fails that video alone, named; then a server-side path within them is indexed."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "c.webm").write_bytes(clips["c"])
    (root / "cut.mp4").write_bytes(clips["a"][:2000])
    with ServiceProcess(tmp_path / "data", triton, "--video-max-seconds", "6.2", "--video-max-samples", "30",
                        "--video-max-pixels", "10000", "--root", str(root)) as service, \
            WireClient(service.address) as client:
        results = list(client.add_videos([
            pb.AddVideoRequest(video=clips["b"], options=OPTIONS),  # 6.5 s
            pb.AddVideoRequest(video=clips["a"], options=pb.VideoOptions(every_s=0.1)),  # 60 samples
            pb.AddVideoRequest(video=write_clip(Clip("big", "mpeg4", "mp4", ["coins"], [0.5], size=(160, 120))), options=OPTIONS),
            pb.AddVideoRequest(video=clips["a"], options=pb.VideoOptions(every_s=0.01)),
            pb.AddVideoRequest(video=clips["a"], metadata={"start_s": "3"}),
            pb.AddVideoRequest(video=clips["a"], options=OPTIONS),  # within every limit
            pb.AddVideoRequest(path=str(root / "cut.mp4"), options=OPTIONS),
            pb.AddVideoRequest(path=str(root / "c.webm"), options=OPTIONS),
        ]))
        errors = [(r.error.code, r.error.message) for r in results[:5]]
        assert all(code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for code, _ in errors), errors
        for (_, message), name in zip(errors, ["max_seconds", "max_samples", "max_pixels", "every_s", "reserved"]):
            assert name in message, (name, message)
        assert results[5].outcome == pb.AddImageResult.ADDED
        assert results[6].error.message.startswith(f"{root / 'cut.mp4'}: not a video"), results[6]
        assert results[7].outcome == pb.AddImageResult.ADDED and len(results[7].video.scenes) == 3
        assert client.get(results[7].id).uri == f"file://{root / 'c.webm'}" and client.stats().count == 6


# ---------------------------------------------------------------- deletes
def test_deleting_a_video_removes_exactly_its_scenes(client, indexed, clips):
    (added,) = client.add_videos([pb.AddVideoRequest(video=write_clip(Clip("d", "mpeg4", "mp4", ["coins", "rocket"],
                                                                             [1.0, 1.0])), options=OPTIONS)])
    others = {s.id for r in indexed.values() for s in r.video.scenes}
    before = client.stats().count
    with pytest.raises(grpc.RpcError) as caught:  # a scene alone: no, it goes with its video
        client.delete(added.video.scenes[0].id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and added.id in caught.value.details()
    assert client.delete(added.id).id == added.id
    assert client.stats().count == before - len(added.video.scenes)
    for scene in added.video.scenes:
        with pytest.raises(grpc.RpcError) as caught:
            client.get(scene.id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    left = {h.id for h in client.search_text("a photo", k=100).hits}
    assert left == others
    with pytest.raises(grpc.RpcError) as caught:
        client.get(added.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_kill_9_around_a_delete_never_splits_a_video(tmp_path, triton, clips):
    """One Delete acknowledged, then SIGKILL the moment the database shows the next one's video row gone (read
    from another connection: that delete has committed something): after a restart each video is there with
    every scene it was stored with, or neither it nor any of its scenes; the database holds no scene of a missing
    video nor a video missing a scene. (A delete committed in two steps fails this: checked by splitting it.)"""
    pictures = ["coins", "rocket", "logo"]
    made = [write_clip(Clip(f"k{i}", "mpeg4", "mp4", pictures[i:] + pictures[:i], [0.75, 0.75, 0.75]))
            for i in range(3)]  # three different videos
    database = tmp_path / "store.sqlite3"
    with ServiceProcess(tmp_path, triton) as service, WireClient(service.address) as client:
        added = list(client.add_videos([pb.AddVideoRequest(video=v, options=OPTIONS) for v in made]))
        assert [r.outcome for r in added] == [pb.AddImageResult.ADDED] * 3
        acknowledged = {client.delete(added[0].id).id}
        pending = client.stub.Delete.future(pb.DeleteRequest(id=added[1].id), timeout=30)  # kept: dropped, it is cancelled
        deadline = time.monotonic() + 30
        while _video_rows(database, added[1].id) and time.monotonic() < deadline:
            time.sleep(0.001)
        service.kill()
        assert not _video_rows(database, added[1].id), pending
    _assert_whole_videos(database)
    with ServiceProcess(tmp_path, triton) as service, WireClient(service.address) as client:
        present = []
        for result in added:
            scene_ids = [s.id for s in result.video.scenes]
            try:
                got = client.get(result.id)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                assert not any(_exists(client, i) for i in scene_ids)
                continue
            present.append(result.id)
            assert [s.id for s in got.video.scenes] == scene_ids and all(_exists(client, i) for i in scene_ids)
        assert present == [added[2].id] and not acknowledged & set(present)
        assert client.stats().count == client.stats().indexed == _scene_count(database) == 3


def _video_rows(database: Path, video_id: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM videos WHERE id = ?", (video_id,)).fetchone()[0]


def _assert_whole_videos(database: Path) -> None:
    with sqlite3.connect(database) as db:
        orphans = db.execute("SELECT count(*) FROM scenes WHERE video_id NOT IN (SELECT id FROM videos)").fetchone()[0]
        lost = db.execute("SELECT count(*) FROM scenes WHERE vid NOT IN (SELECT vid FROM items)").fetchone()[0]
        empty = db.execute("SELECT count(*) FROM videos WHERE id NOT IN (SELECT video_id FROM scenes)").fetchone()[0]
    assert (orphans, lost, empty) == (0, 0, 0)


def _scene_count(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT count(*) FROM scenes").fetchone()[0]


def _exists(client: WireClient, item_id: str) -> bool:
    try:
        client.get(item_id)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False


def _search(client: WireClient, text: str, k: int, page_token: str = "", group_by_video: bool = False,
            where=(), filters=None, with_captions: bool = False) -> pb.SearchResponse:
    options = pb.SearchOptions(k=k, page_token=page_token, group_by_video=group_by_video, where=list(where),
                               filters=filters or {}, with_captions=with_captions)
    return client.stub.SearchText(pb.SearchTextRequest(text=text, options=options), timeout=120)


# ---------------------------------------------------------------- clients
def test_coca_index_takes_videos_beside_images_and_search_prints_moments(tmp_path, service, clips, capsys):
    """`coca index DIR` sends the folder's videos after its images; `coca search` shows a scene hit as
    `name HH:MM:SS–HH:MM:SS  score  caption`; the Python client exposes the scene fields."""
    from clients.cli import main
    from clients.coca_client import Client

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "still.png").write_bytes(png(picture("clock")))
    clip = Clip("e", "mpeg4", "mp4", ["brick", "astronaut"], [1.5, 1.5])
    (folder / "e.mp4").write_bytes(write_clip(clip))
    capsys.readouterr()
    assert main(["index", str(folder), "--server", service.address, "--every", str(EVERY_S),
                 "--scene-threshold", str(THRESHOLD)]) == 0
    out = capsys.readouterr().out
    assert "1 files: 1 added" in out and "1 videos: 1 added, 0 already indexed, 0 failed; 2 scenes" in out, out
    with Client(service.address) as client:
        hit = client.search_image(png(picture("brick")), k=1, filters={"video_id": _video_id(client, "e.mp4")}).hits[0]
        assert (hit.start_s, hit.end_s) == (0.0, 1.5) and hit.uri.endswith("e.mp4")
        grouped = client.search_text("a photo", k=100, group_by_video=True).hits
        assert len({h.video_id or h.id for h in grouped}) == len(grouped)
    query = tmp_path / "brick.png"
    query.write_bytes(png(picture("brick")))
    assert main(["search", "--image", str(query), "-k", "20", "--server", service.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(rf"\s*\d+  e\.mp4 00:00:00–00:00:01  {hit.score:.2f}", line) for line in lines), lines


def _video_id(client, name: str) -> str:
    return next(h.video_id for h in client.search_text("x", k=100).hits if h.uri.endswith(name))


# ---------------------------------------------------------------- without a service
def test_a_truncated_matroska_decodes_up_to_the_break(clips):
    from coca import media

    full = [f.time_s for f in media.sample_frames(clips["b"], EVERY_S)]
    cut = [f.time_s for f in media.sample_frames(clips["b"][: len(clips["b"]) // 2], EVERY_S)]
    assert 0 < len(cut) < len(full) and cut == full[:len(cut)]


def test_the_cutter_falls_back_to_fixed_windows_and_keeps_min_length():
    from search_service.scenes import SceneCutter, SceneSettings

    steady = SceneCutter(SceneSettings(every_s=0.5, threshold=0.5, min_scene_s=1.0, max_scene_s=2.0))
    scenes = [s for i in range(10) for s in steady.add(i * 0.5, np.array([1.0, 0.0]), b"k%d" % i)] + steady.finish(5.0)
    assert [(s.start_s, s.end_s, s.frames) for s in scenes] == [(0, 2, 4), (2, 4, 4), (4, 5, 2)]
    assert [s.keyframe for s in scenes] == [b"k2", b"k6", b"k9"]  # nearest the middle (ties: the earlier)
    flicker = SceneCutter(SceneSettings(every_s=0.5, threshold=0.5, min_scene_s=1.0, max_scene_s=30))
    vectors = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]  # every frame a cut, but scenes last >= 1 s
    scenes = [s for i in range(6) for s in flicker.add(i * 0.5, vectors[i % 2], b"")] + flicker.finish(3.0)
    assert [(s.start_s, s.end_s) for s in scenes] == [(0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    mean = np.array([1.0, 1.0]) / np.sqrt(2)
    assert all(np.allclose(s.embedding, mean) for s in scenes)


def _offline_video(engine, seed: int, scenes: int = 3, data: bytes = b""):
    """A video of random embeddings through Engine.add_video (no decoding: the store's side alone)."""
    from search_service.store import NewItem, NewScene, NewVideo, sha256_hex

    rng = np.random.default_rng(seed)
    data = data or rng.bytes(1000)
    sha = sha256_hex(data)
    rows = []
    for i in range(scenes):
        vector = rng.normal(size=8).astype(np.float32)
        item = NewItem(sha256=sha256_hex(sha.encode() + bytes([i])), uri="v.mp4", embedding=vector / np.linalg.norm(vector),
                       id=f"{sha[:32]}.scene{i}", metadata={"video_id": sha[:32], "start_s": str(float(i)),
                                                            "end_s": str(i + 1.0), "video_duration_s": str(float(scenes))})
        rows.append(NewScene(item, i, float(i), i + 1.0, b"jpeg%d" % i))
    return engine.add_video(NewVideo(sha, "v.mp4", "", {}, float(scenes), scenes * 2, data), rows), data


def test_video_rows_survive_a_reopen_and_an_older_store_gains_the_tables(tmp_path):
    """The blob sweep at start keeps video bytes; a data directory made before videos opens with empty video
    tables and its items intact; a delete takes the video, its scenes and its blob."""
    from search_service.engine import Engine
    from search_service.index import IndexSettings
    from search_service.store import Store

    def opened() -> Engine:
        engine = Engine(tmp_path, IndexSettings())
        engine.bind_model("m", "p", 8)
        engine.open_index(8)
        return engine

    engine = opened()
    (outcome, data) = _offline_video(engine, 0)
    again, _ = _offline_video(engine, 0, data=data)
    assert outcome.added and not again.added and [s.id for s in again.scenes] == [s.id for s in outcome.scenes]
    engine.close()
    engine = opened()
    video = engine.get_video(outcome.id)
    assert engine.read_video(video) == data and [s.index for s in video.scenes] == [0, 1, 2]
    assert engine.read_image(engine.get(outcome.scenes[1].id)) == b"jpeg1"
    assert engine.delete_video(outcome.id).id == outcome.id and engine.size == 0
    assert engine.get_video(outcome.id) is None and not (tmp_path / video.blob).exists()
    from search_service.store import NewItem

    engine.add([NewItem(sha256="ab" * 32, uri="still.png", embedding=np.eye(8, dtype=np.float32)[0], data=b"png")])
    engine.close()
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:  # a store from before videos
        db.execute("DROP TABLE scenes")
        db.execute("DROP TABLE videos")
    store = Store(tmp_path)
    assert store.video_count() == 0 and store.count() == 1 and store.get_video("x") is None
    store.close()


def test_milvus_collections_refuse_videos_naming_what_is_missing():
    import asyncio
    from types import SimpleNamespace

    from search_service.milvus import MilvusCollection
    from search_service.service import SearchServicer

    class Context:
        async def abort(self, code, message, trailing_metadata=()):
            raise grpc.aio.AbortError(f"{code.name}: {message}")

    async def nothing(**_):
        return None

    async def call():
        servicer = SimpleNamespace(engine=MilvusCollection.__new__(MilvusCollection), ensure_models=nothing)
        return [m async for m in SearchServicer.AddVideos(servicer, iter([]), Context())]

    with pytest.raises(grpc.aio.AbortError, match="FAILED_PRECONDITION: .*videos: this store keeps no video rows"):
        asyncio.run(call())


def test_decoded_bytes_and_decoding_time_are_limits_named_too(clips):
    from coca.media import VideoLimitError, VideoLimits, sample_frames

    for limits, name in [(VideoLimits(max_decoded_bytes=100_000), "max_decoded_bytes"),
                         (VideoLimits(max_decode_seconds=0), "max_decode_seconds")]:
        with pytest.raises(VideoLimitError, match=name) as caught:
            list(sample_frames(clips["a"], EVERY_S, limits))
        assert caught.value.limit == name
    assert len(list(sample_frames(clips["a"], EVERY_S, VideoLimits(max_decoded_bytes=10_000_000)))) == 24
