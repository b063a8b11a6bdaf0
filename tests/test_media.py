"""coca.media on real files written into tmp dirs: every bad input gives a typed error."""

import struct
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from coca.errors import InvalidImageError, InvalidVideoError
from coca.media import ALPHA_BACKGROUND, is_video, load_image, video_frames

# ------------------------------------------------------------------ helpers


def noise_image(width=96, height=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A syntactically valid PNG whose IHDR claims width x height pixels (no real data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# Frame i of the test video is flat grey level 8*i, so a decoded frame tells
# which source frame it was: grey survives YUV 4:2:0 and lossy coding within
# about +-2 levels (a hue would drift more through chroma subsampling).
VIDEO_FRAMES = 30


def frame_colour(i: int) -> tuple[int, int, int]:
    return (i * 8,) * 3


def frame_index(image: Image.Image) -> int:
    return int(round(np.asarray(image, dtype=np.float64).mean() / 8))


def write_video(path: Path, frames: int = VIDEO_FRAMES, codec: str = "mpeg4") -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10, options={"g": "1"})  # intra-only: no drift
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(frames):
            image = Image.new("RGB", (64, 48), frame_colour(i))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "colours.mp4")


# ------------------------------------------------------------------ images: good


def test_png_path_round_trips_pixels(tmp_path):
    original = noise_image()
    original.save(tmp_path / "noise.png")
    loaded = load_image(tmp_path / "noise.png")
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(original))


def test_accepts_str_path_bytes_and_pil_image(tmp_path):
    path = tmp_path / "photo.jpg"
    noise_image().save(path, quality=95)
    from_str = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    from_pil = load_image(Image.open(path))
    assert from_str.size == from_bytes.size == from_pil.size == (96, 64)
    assert np.array_equal(np.asarray(from_str), np.asarray(from_bytes))


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    Image.new("L", (20, 10), 77).save(tmp_path / "gray.png")
    pixels = np.asarray(load_image(tmp_path / "gray.png"))
    assert pixels.shape == (10, 20, 3)
    assert (pixels == 77).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red ink
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    red, green, blue = np.asarray(load_image(tmp_path / "cmyk.jpg"), dtype=int)[16, 16]
    assert red > 200 and green < 50 and blue < 50


def test_transparent_pixels_composite_on_white(tmp_path):
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    image.save(tmp_path / "alpha.png")
    pixels = np.asarray(load_image(tmp_path / "alpha.png"))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[1, 3]) == ALPHA_BACKGROUND


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "palette.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "palette.png"))
    assert tuple(pixels[1, 1]) == (0, 255, 0)
    assert tuple(pixels[0, 0]) == ALPHA_BACKGROUND


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    values[0, 0] = 65535
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert tuple(pixels[4, 4]) == (128, 128, 128)  # convert("L") would give 255
    assert tuple(pixels[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 60)
    red, _, blue = np.asarray(upright, dtype=int)[2, 10]  # the stripe is now on top
    assert blue > 200 and red < 50


# ------------------------------------------------------------------ images: bad


def test_truncated_jpeg_raises_and_names_the_file(tmp_path):
    path = tmp_path / "photo.jpg"
    noise_image(256, 256).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match=r"photo\.jpg: truncated JPEG"):
        load_image(path)


def test_truncated_png_raises(tmp_path):
    noise_image(128, 128).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    with pytest.raises(InvalidImageError, match=r"<bytes, \d+ B>: (truncated|corrupt) PNG"):
        load_image(data[: len(data) * 2 // 3])


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(1).integers(0, 256, 1234, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError, match=r"^<bytes, 1234 B>: not an image"):
        load_image(data)


def test_empty_file_and_empty_bytes(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty\.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InvalidImageError, match=r"<bytes, 0 B>: empty"):
        load_image(b"")


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match=r"nope\.jpg: cannot read: No such file"):
        load_image(tmp_path / "nope.jpg")


def test_zero_size_pil_image():
    with pytest.raises(InvalidImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    "width, height",
    [
        (100_000, 100_000),  # Pillow itself raises DecompressionBombError
        (10_000, 10_000),  # Pillow only warns (100 MP) -- we must still raise
        (8_000, 6_000),  # under Pillow's limits, over ours (40 MP)
    ],
)
def test_decompression_bomb_raises_without_warning(tmp_path, width, height):
    path = png_with_header_size(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any Pillow warning escaping fails the test
        with pytest.raises(InvalidImageError, match=r"bomb\.png: .*decompression bomb"):
            load_image(path)


def test_max_pixels_is_configurable(tmp_path):
    noise_image(100, 100).save(tmp_path / "small.png")
    with pytest.raises(InvalidImageError, match="over the limit of 9999"):
        load_image(tmp_path / "small.png", max_pixels=9_999)
    assert load_image(tmp_path / "small.png", max_pixels=10_000).size == (100, 100)


def test_extreme_aspect_ratio_is_refused_before_decoding():
    """Found by the fuzz suite: a 69-byte PNG claiming 1x65535 took 74 s in open_clip's resize."""
    from tests.reliability.test_fuzz import png_claiming

    for width, height in [(1, 65535), (7000, 1), (1, 101)]:
        with pytest.raises(InvalidImageError, match=r"aspect ratio of \d+:1, over the limit of 100:1"):
            load_image(png_claiming(width, height))
    tall = Image.new("RGB", (3, 300), (1, 2, 3))
    assert load_image(tall).size == (3, 300)  # 100:1 is allowed
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (2, 300)))  # in-memory images too


def test_unsupported_type_is_a_programming_error():
    with pytest.raises(TypeError):
        load_image(12345)


# ------------------------------------------------------------------ videos


def test_video_frames_are_uniformly_sampled(video_path):
    frames = video_frames(video_path, n=5)
    assert len(frames) == 5
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    expected = np.round(np.linspace(0, VIDEO_FRAMES - 1, 5)).astype(int).tolist()  # [0, 7, 14, 22, 29]
    assert [frame_index(f) for f in frames] == expected


def test_video_from_bytes_matches_path(video_path):
    from_bytes = video_frames(video_path.read_bytes(), n=3)
    assert [frame_index(f) for f in from_bytes] == [0, 14, 29]


def test_default_is_16_frames(video_path):
    assert len(video_frames(video_path)) == 16


def test_short_video_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", frames=3)
    assert [frame_index(f) for f in video_frames(path, n=6)] == [0, 0, 1, 1, 2, 2]  # round(linspace(0, 2, 6))


def test_container_without_frame_count_is_counted(tmp_path):
    # Matroska/WebM headers carry no frame count: the counting pass is used.
    path = write_video(tmp_path / "colours.mkv", codec="mpeg4")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert [frame_index(f) for f in video_frames(path, n=3)] == [0, 14, 29]


def test_zero_frame_video(tmp_path):
    # With no frame muxed, the MP4 declares no video stream at all.
    path = write_video(tmp_path / "empty.mp4", frames=0)
    with pytest.raises(InvalidVideoError, match=r"empty\.mp4: no video stream"):
        video_frames(path)


def test_video_with_undecodable_frames(video_path, tmp_path):
    # Valid container and index, every frame's data zeroed.
    data = bytearray(video_path.read_bytes())
    at = data.index(b"mdat")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    (tmp_path / "zeroed.mp4").write_bytes(data)
    with pytest.raises(InvalidVideoError, match=r"zeroed\.mp4: no decodable video frames"):
        video_frames(tmp_path / "zeroed.mp4")


def test_truncated_video(video_path, tmp_path):
    data = video_path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidVideoError, match=r"cut\.mp4: "):
        video_frames(tmp_path / "cut.mp4")


def test_every_truncation_of_a_video_decodes_or_is_invalid(video_path):
    """Found by the fuzz suite: a cut inside the header left a stream without a codec (AttributeError)."""
    data = video_path.read_bytes()
    outcomes = set()
    for n in range(0, len(data), max(1, len(data) // 400)):
        try:
            outcomes.add(len(video_frames(data[:n], 4)))
        except InvalidVideoError:
            outcomes.add("invalid")
    assert outcomes == {4, "invalid"}


def test_random_bytes_are_not_a_video():
    data = np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidVideoError, match=r"^<bytes, 4000 B>: not a video"):
        video_frames(data)


def test_video_rejects_empty_data_and_bad_n():
    with pytest.raises(InvalidVideoError):
        video_frames(b"")
    with pytest.raises(ValueError):
        video_frames(b"x", n=0)


# ------------------------------------------------------------------ sniffing


def test_is_video_sniffs_content_not_extension(video_path, tmp_path):
    noise_image().save(tmp_path / "photo.png")
    noise_image().save(tmp_path / "photo.jpg")
    disguised = tmp_path / "actually_video.png"
    disguised.write_bytes(video_path.read_bytes())
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    assert is_video(video_path)
    assert is_video(video_path.read_bytes())
    assert is_video(disguised)
    assert not is_video(tmp_path / "photo.png")
    assert not is_video(tmp_path / "photo.jpg")
    assert not is_video((tmp_path / "photo.jpg").read_bytes())
    assert not is_video(tmp_path / "anim.gif")
    assert not is_video(Image.new("RGB", (2, 2)))


def test_is_video_is_false_for_junk(tmp_path):
    assert not is_video(b"")
    assert not is_video(b"hello world, not media at all")
    assert not is_video(tmp_path / "missing.mp4")
    assert not is_video(png_with_header_size(tmp_path / "bomb.png", 100_000, 100_000))


@pytest.mark.parametrize("claimed", [50, 12])  # header says more / fewer frames than there are
def test_wrong_header_frame_count_is_corrected(video_path, monkeypatch, claimed):
    import coca.media

    monkeypatch.setattr(coca.media, "_header_frame_count", lambda *args: claimed)
    assert [frame_index(f) for f in video_frames(video_path, n=3)] == [0, 14, 29]


def test_still_image_is_not_a_video(tmp_path):
    noise_image().save(tmp_path / "photo.jpg")
    with pytest.raises(InvalidVideoError, match=r"photo\.jpg: a still image \(\w+\), not a video"):
        video_frames(tmp_path / "photo.jpg")


# ------------------------------------------------------------------ video bombs


def write_yuv_video(path: Path, frames: int, width: int, height: int, pattern: bool = False) -> Path:
    """H.264 written straight from YUV planes (fast even for large frames): flat grey level 16 + 8*i
    per frame, or (pattern) a smooth picture that moves with i."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yuv = np.full((height * 3 // 2, width), 128, np.uint8)
        y, x = np.mgrid[0:height, 0:width]
        for i in range(frames):
            if pattern:
                yuv[:height] = (128 + 100 * np.sin(x / width * 6 + i) * np.cos(y / height * 4 - i)).astype(np.uint8)
            else:
                yuv[:height] = (16 + 8 * i) % 236
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # the header's frame count; none (counted while decoding)
def test_video_with_too_many_frames_is_refused(tmp_path, suffix):
    path = write_yuv_video(tmp_path / f"long.{suffix}", 301, 16, 16)
    with pytest.raises(InvalidVideoError, match=rf"long\.{suffix}: over 300 frames"):
        video_frames(path, 4, max_frames=300)
    assert len(video_frames(path, 4, max_frames=301)) == 4


def test_video_decoding_stops_at_its_time_budget(tmp_path):
    path = write_yuv_video(tmp_path / "slow.mkv", 600, 64, 48)
    with pytest.raises(InvalidVideoError, match=r"slow\.mkv: decoding took over 0\.02 s \(\d+ frames decoded\)"):
        video_frames(path, 4, max_seconds=0.02)


def test_every_decoded_frame_is_size_checked(tmp_path, monkeypatch):
    """A stream can change size after its header: the decoded frames are checked, not just the header."""
    import coca.media

    path = write_yuv_video(tmp_path / "big.mp4", 3, 640, 480)
    monkeypatch.setattr(coca.media, "_header_frame_count", lambda *args: 0)  # as if the header said nothing
    with pytest.raises(InvalidVideoError, match=r"640x480 = 307200 pixels, over the limit of 100000"):
        video_frames(path, 2, max_pixels=100_000)


def test_large_frames_are_downscaled_as_decoded_and_memory_stays_small(tmp_path):
    """16 frames of 12 MP from an 0.8 MB file: kept as full RGB images that was ~1 GB of peak memory;
    now each is scaled by FFmpeg to a short side of 448 before it becomes an RGB image."""
    import json
    import subprocess
    import sys

    path = write_yuv_video(tmp_path / "huge.mp4", 16, 4000, 3000)
    script = ("import json, resource, sys\nimport numpy as np\nfrom coca import media\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "frames = media.video_frames(sys.argv[1], 16)\n"
              "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
              "print(json.dumps({'grown_mb': grown / 1024, 'sizes': sorted({f.size for f in frames}),\n"
              "                  'means': [float(np.asarray(f).mean()) for f in frames]}))")
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    found = json.loads(run.stdout)
    assert found["sizes"] == [[597, 448]]  # 4000x3000: short side 448, aspect kept
    assert found["grown_mb"] < 350, f"peak memory grew by {found['grown_mb']:.0f} MB while decoding"
    expected = [(8 * i) * 255 / 219 for i in range(16)]  # luma 16 + 8i (limited range) as RGB grey
    assert np.allclose(found["means"], expected, atol=3), found["means"]  # every frame, in order


def test_normal_video_frames_are_unchanged_and_large_ones_preprocess_alike(tmp_path, tiny_coca):
    """Frames up to a short side of 448 are kept exactly as decoded (so captions of such videos are as
    before); larger ones are downscaled, and open_clip's preprocessing of them is close to that of the
    full frames (it resizes the short side to 224 anyway)."""
    import torch

    small = write_yuv_video(tmp_path / "small.mp4", 10, 640, 360, pattern=True)
    large = write_yuv_video(tmp_path / "large.mp4", 10, 1920, 1080, pattern=True)
    for path, size in ((small, (640, 360)), (large, (796, 448))):
        with av.open(str(path)) as container:
            decoded = [f.to_image() for f in container.decode(video=0)]
        frames = video_frames(path, 4)
        chosen = [decoded[i] for i in [0, 3, 6, 9]]
        assert all(f.size == size for f in frames)
        if path is small:
            assert all(np.array_equal(np.asarray(f), np.asarray(c)) for f, c in zip(frames, chosen))
        else:
            ours = torch.stack([tiny_coca.preprocess(f) for f in frames])
            full = torch.stack([tiny_coca.preprocess(c) for c in chosen])
            assert float((ours - full).abs().mean()) < 0.03, float((ours - full).abs().mean())  # ~1 grey level
            similarity = tiny_coca.embed_images(frames) @ tiny_coca.embed_images(chosen).T
            assert np.diag(similarity).min() > 0.999, np.diag(similarity)
