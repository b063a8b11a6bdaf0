"""Bad input fuzzing: generated malformed requests against the real gRPC service (hypothesis).

Random bytes as images, truncated PNG/JPEG/WebP/GIF/TIFF, headers claiming giant or zero
dimensions, grayscale/CMYK/alpha/16-bit/palette/bilevel images, huge or empty or non-UTF-8 text,
k <= 0 or huge, unknown ids, bad metadata and ids, server-side paths that escape the roots,
bad video, bad sampling settings. Every reply must be a success or a proper status (never
INTERNAL/UNKNOWN/UNAVAILABLE) with a non-empty message; the service never dies; the store grows
exactly by the items reported ADDED (rejected items leave the index unchanged; Stats count ==
indexed after every case). The number of cases per kind is recorded in the figures.
"""
from __future__ import annotations

import collections
import struct
import time
import zlib

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import encode, needs_triton, short, unique_jpegs

pytestmark = needs_triton

SERVICE = "/coca.search.v1.SearchService/"
PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.ALREADY_EXISTS}


# ---------------------------------------------------------------- raw protobuf (for non-UTF-8 strings)
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) of any bytes, valid UTF-8 or not."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# ---------------------------------------------------------------- crafted images
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a few bytes of pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG with its SOF0 frame header patched to claim width x height (at most 65535 each)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 30, 200)), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


MODES = [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I;16", "PNG"),
         ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("L", "JPEG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("P", "GIF"),
         ("F", "TIFF"), ("I", "TIFF"), ("RGB", "BMP"), ("RGB", "PPM"), ("RGB", "ICO")]


@st.composite
def odd_images(draw) -> bytes:
    """Valid but unusual images: any mode, tiny to small sizes."""
    mode, fmt = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 255))
    image = Image.new("RGB", (w, h), (seed, 255 - seed, (seed * 7) % 256)).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        image = Image.frombytes("I;16", (w, h), bytes((i * seed) % 256 for i in range(2 * w * h)))
    return encode(image, fmt)


GOOD = unique_jpegs(4242, 8, size=48)
GOOD_PNG = encode(Image.new("RGBA", (33, 21), (10, 200, 30, 128)), "PNG")


@st.composite
def truncated(draw) -> bytes:
    source = draw(st.sampled_from([*GOOD[:3], GOOD_PNG, encode(Image.new("RGB", (30, 30)), "WEBP"),
                                   encode(Image.new("P", (30, 30)), "GIF"), encode(Image.new("RGB", (30, 30)), "TIFF")]))
    return source[:draw(st.integers(0, len(source) - 1))]


@st.composite
def corrupted(draw) -> bytes:
    """A valid image with a few bytes overwritten."""
    data = bytearray(draw(st.sampled_from(GOOD[3:])))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


giant = st.one_of(
    st.tuples(st.sampled_from([0, 1, 7_000, 65_535, 100_000, 2**31 - 1]), st.sampled_from([0, 1, 7_000, 65_535, 2**31 - 1]))
    .map(lambda wh: png_claiming(*wh)),
    st.tuples(st.sampled_from([0, 1, 9_000, 65_535]), st.sampled_from([0, 1, 9_000, 65_535])).map(lambda wh: jpeg_claiming(*wh)),
)
image_bytes = st.one_of(st.binary(max_size=2048), st.just(b""), truncated(), corrupted(), giant, odd_images(),
                        st.binary(min_size=8, max_size=300).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                        st.binary(min_size=2, max_size=300).map(lambda b: b"\xff\xd8\xff" + b))
texts = st.one_of(st.text(max_size=200), st.just(""), st.just("   "), st.just("\x00"),
                  st.integers(1, 200_000).map(lambda n: "a cat " * n))
bad_utf8 = st.one_of(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"]),
                     st.binary(min_size=1, max_size=64).filter(lambda b: not _is_utf8(b)))
ks = st.one_of(st.integers(-5, 1005), st.sampled_from([-2**31, 0, 1000, 1001, 2**31 - 1]))
ids = st.one_of(st.text(max_size=300), st.just(""), st.just(" x "), st.just("a" * 257), st.text(alphabet="0123456789abcdef",
                                                                                                 min_size=32, max_size=32))
metadata = st.one_of(st.dictionaries(st.text(max_size=300), st.text(max_size=50), max_size=5),
                     st.integers(60, 70).map(lambda n: {f"k{i}": "v" for i in range(n)}),
                     st.just({"k": "v" * 5000}), st.just({"": "empty key"}))
path_parts = st.sampled_from(["..", ".", "ok.jpg", "nested", "ok2.png", "escape.jpg", "escape_dir", "secret.jpg",
                              "missing.jpg", "not_an_image.jpg", "", "/", "/etc/passwd", "/proc/self/environ", "~",
                              "\x00", "a" * 300])
paths = st.lists(path_parts, min_size=1, max_size=4).map("/".join)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _search_options(pb, k, min_score, filters, with_captions=False):
    options = pb.SearchOptions(k=k, filters=filters, with_captions=with_captions)
    if min_score is not None:
        options.min_score = min_score
    return options


@st.composite
def sampling(draw):
    from search_service.pb import search_pb2 as pb

    s = pb.SamplingSettings()
    for name, strategy in [("temperature", floats), ("top_k", st.integers(-5, 100_000)), ("top_p", floats),
                           ("num_beams", st.integers(-2, 40)), ("num_beam_groups", st.integers(-2, 10)),
                           ("repetition_penalty", floats), ("min_tokens", st.integers(-5, 100)),
                           ("max_tokens", st.integers(-5, 1000)), ("seed", st.integers(-2**63, 2**63 - 1))]:
        if draw(st.booleans()):
            setattr(s, name, draw(strategy))
    if s.HasField("max_tokens") and s.max_tokens > 12 and draw(st.booleans()):
        s.max_tokens = 12  # keep most decodes short
    return s


# ---------------------------------------------------------------- cases
@st.composite
def cases(draw, video: bytes):
    """(kind, method, request, streaming): request is a message, raw bytes, or a list of either."""
    from search_service.pb import search_pb2 as pb

    kind = draw(st.sampled_from(["add_bytes", "add_path", "add_meta", "add_raw_utf8", "add_stream_mix",
                                 "search_text", "search_text_raw", "search_image", "caption_image", "caption_video",
                                 "classify", "rank", "get", "delete"]))
    if kind == "add_bytes":
        return kind, "AddImages", [pb.AddImageRequest(image=draw(image_bytes))], True
    if kind == "add_path":
        return kind, "AddImages", [pb.AddImageRequest(path=draw(paths))], True
    if kind == "add_meta":
        return kind, "AddImages", [pb.AddImageRequest(image=draw(st.sampled_from(GOOD + [b"x"])), id=draw(ids),
                                                      metadata=draw(metadata))], True
    if kind == "add_raw_utf8":  # non-UTF-8 in the path, id, uri or a metadata key/value
        bad = draw(bad_utf8)
        number = draw(st.sampled_from([2, 3, 5, 4]))
        payload = field(1, bad) + field(2, b"v") if number == 4 else bad
        return kind, "AddImages", [field(1, GOOD[0]) + field(number, payload)], True
    if kind == "add_stream_mix":  # good and bad items in one stream: the bad fail alone
        items = draw(st.lists(st.one_of(image_bytes.map(lambda b: pb.AddImageRequest(image=b)),
                                        paths.map(lambda p: pb.AddImageRequest(path=p)),
                                        st.just(pb.AddImageRequest())), min_size=2, max_size=6))
        return kind, "AddImages", items, True
    if kind == "search_text":
        min_score = draw(st.one_of(st.none(), floats))
        request = pb.SearchTextRequest(text=draw(texts), options=_search_options(
            pb, draw(ks), min_score, draw(st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=3))))
        return kind, "SearchText", request, False
    if kind == "search_text_raw":
        return kind, "SearchText", field(1, draw(bad_utf8)), False
    if kind == "search_image":
        if draw(st.booleans()):
            request = pb.SearchImageRequest(image=draw(image_bytes), options=pb.SearchOptions(k=draw(ks)))
        else:
            request = pb.SearchImageRequest(id=draw(ids), options=pb.SearchOptions(k=draw(ks)))
        return kind, "SearchImage", request, False
    if kind == "caption_image":
        image = draw(st.one_of(image_bytes, st.sampled_from(GOOD)))
        return kind, "Caption", pb.CaptionRequest(image=image, sampling=draw(sampling())), False
    if kind == "caption_video":
        data = draw(st.one_of(st.binary(max_size=2048), st.integers(0, len(video)).map(lambda n: video[:n]),
                              st.sampled_from(GOOD), st.just(video)))
        return kind, "Caption", pb.CaptionRequest(video=data, frames=draw(st.integers(-3, 200)),
                                                  sampling=pb.SamplingSettings(max_tokens=4)), False
    if kind in ("classify", "rank"):
        ref = pb.ImageRef(image=draw(st.one_of(image_bytes, st.sampled_from(GOOD)))) if draw(st.booleans()) \
            else pb.ImageRef(id=draw(ids))
        labels = draw(st.one_of(st.lists(texts, max_size=4), st.integers(1001, 1100).map(lambda n: ["x"] * n)))
        if kind == "classify":
            template = draw(st.one_of(st.just(""), st.text(max_size=40), st.just("{} {}"), st.just("{0}{1}{x}")))
            return kind, "Classify", pb.ClassifyRequest(image=ref, labels=labels, template=template), False
        return kind, "Rank", pb.RankRequest(image=ref, texts=labels), False
    if kind == "get":
        return kind, "Get", pb.GetRequest(id=draw(ids), include_image=True, include_embedding=True), False
    return kind, "Delete", pb.DeleteRequest(id=draw(ids)), False


def describe(request) -> str:
    """A short account of a case's request(s): what each item holds and how big it is."""
    if isinstance(request, list):
        return "[" + ", ".join(describe(r) for r in request) + "]"
    if isinstance(request, bytes):
        return f"raw({len(request)} B)"
    fields = []
    for descriptor, value in request.ListFields():
        if isinstance(value, bytes):
            fields.append(f"{descriptor.name}={len(value)} B {value[:12]!r}")
        else:
            fields.append(f"{descriptor.name}={str(value)[:60]!r}")
    return f"{type(request).__name__}({', '.join(fields)})"


def serialize(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from tests.test_search_service import write_video

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, [Image.new("RGB", (64, 64), (i * 60, 20, 200 - i * 40)) for i in range(4)])
    return path.read_bytes()


@pytest.mark.parametrize("examples", [pytest.param(300, id="300-cases", marks=short),
                                      pytest.param(10_000, id="10000-cases", marks=[pytest.mark.long, pytest.mark.untimed])])
def test_malformed_requests_get_proper_statuses(examples, shared_service, video, figures):
    from search_service.pb import search_pb2 as pb

    channel = grpc.insecure_channel(shared_service.address, options=[("grpc.max_send_message_length", 64 << 20),
                                                                    ("grpc.max_receive_message_length", 64 << 20)])
    responses = {"AddImages": pb.AddImageResult, "SearchText": pb.SearchResponse, "SearchImage": pb.SearchResponse,
                 "Caption": pb.CaptionResponse, "Classify": pb.ClassifyResponse, "Rank": pb.RankResponse,
                 "Get": pb.Item, "Delete": pb.DeleteResponse}
    stubs = {m: (channel.stream_stream if m == "AddImages" else channel.unary_unary)(
        SERVICE + m, request_serializer=serialize, response_deserializer=r.FromString) for m, r in responses.items()}
    stats = channel.unary_unary(SERVICE + "Stats", request_serializer=serialize,
                                response_deserializer=pb.StatsResponse.FromString)
    expected_count = stats(pb.StatsRequest(), timeout=30).count
    tally: collections.Counter = collections.Counter()
    codes: collections.Counter = collections.Counter()
    added = 0

    improper: list[str] = []  # collected, so that one run reports every kind of failure
    changed: list[str] = []  # cases after which the store or index did not hold what the replies said
    previous, started = "", 0.0
    slowest: list = [0.0, ""]  # seconds, case: a slow reply is how the 1x65535 PNG (74 s) showed

    def check_status(code, message, what):
        codes[code.name] += 1
        if code not in PROPER or not (message and message.strip()):
            improper.append(f"{what[:600]}: {code.name}: {message[:300]!r} after {time.monotonic() - started:.1f} s")

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(video))
    def run(case):
        nonlocal expected_count, added, previous, started
        kind, method, request, streaming = case
        started = time.monotonic()
        tally[kind] += 1
        what = f"{kind} {describe(request)}"
        results = []
        try:
            if streaming:
                for r in stubs[method](iter(request), timeout=60):  # counted as they come: a stream may break
                    results.append(r)
                    if r.outcome == pb.AddImageResult.FAILED:
                        check_status(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error.code)),
                                     r.error.message, what)
                    else:
                        assert r.outcome in (pb.AddImageResult.ADDED, pb.AddImageResult.DUPLICATE) and r.id, what
                        codes["OK"] += 1
                    expected_count += r.outcome == pb.AddImageResult.ADDED
                    added += r.outcome == pb.AddImageResult.ADDED
                assert [r.index for r in results] == list(range(len(request))), what
            else:
                stubs[method](request, timeout=60)
                codes["OK"] += 1
        except grpc.RpcError as exc:
            check_status(exc.code(), exc.details(), what)
        assert shared_service.proc.poll() is None, f"the service died on {what}:\n{shared_service.output()}"
        now = stats(pb.StatsRequest(), timeout=30)
        if now.count != expected_count or now.indexed != now.count:
            # Collected with the case and the replies it got, and the count taken as it is now, so that one
            # run reports every such case (an assert here would make hypothesis shrink a stale count).
            changed.append(f"{what[:600]}: replies {[(r.outcome, r.error.code) for r in results]}, count "
                           f"{now.count} (expected {expected_count}), indexed {now.indexed}; previous case: {previous}")
            expected_count = now.count
        took = time.monotonic() - started
        previous = f"{what[:600]} ({took:.1f} s)"
        slowest[:] = max(slowest, [took, what[:300]])

    try:
        run()
    finally:
        channel.close()
    assert not improper, f"{len(improper)} improper replies:\n" + "\n".join(improper[:20])
    assert not changed, f"{len(changed)} cases changed the store unlike their replies:\n" + "\n".join(changed[:20])
    figures.record(f"fuzz: {examples} generated malformed requests", cases=sum(tally.values()), crashes=0,
                   improper_statuses=len(improper), items_added=added, index_changed_by_rejected=0,
                   statuses=dict(sorted(codes.items())), kinds=dict(sorted(tally.items())),
                   slowest_case_s=round(slowest[0], 1), slowest_case=slowest[1])
