"""Turn untrusted image/video bytes or paths into RGB pixels, or a typed error.

Every failure is an InvalidImageError / InvalidVideoError whose message starts
with the source's name (the path as given, or "<bytes, N B>") so that a CLI or
a server can show it to the user as is.
"""

from __future__ import annotations

import io
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Generator, Iterator, Union

import av
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from coca.errors import InvalidImageError, InvalidInputError, InvalidVideoError

# Largest image or video frame we decode, in pixels (width * height). 40 MP
# covers every camera photo; anything larger is more likely a decompression
# bomb (a tiny file whose header promises gigabytes of pixels).
DEFAULT_MAX_PIXELS = 40_000_000

# Videos: a small file can hold hours of frames, or frames of 40 MP each, and decoding runs in a
# thread nothing can interrupt. So decoding stops past a frame count and a wall-clock budget, every
# decoded frame's size is checked (a stream can change size after its header), and the frames kept
# are downscaled as they are decoded, to what the image preprocessing needs (open_clip resizes the
# short side to 224 and crops the centre): short side at most 448, and at most 4 x 448 x 448 pixels.
DEFAULT_MAX_VIDEO_FRAMES = 10_000  # 5.5 min at 30 fps
DEFAULT_MAX_DECODE_SECONDS = 60.0
KEPT_FRAME_SHORT_SIDE = 448
KEPT_FRAME_PIXELS = 4 * 448 * 448

# Widest aspect ratio we accept (long side : short side). open_clip resizes the short side to
# the model's input size before the centre crop, so a 1x65535 PNG of 69 bytes would become a
# 224 x 14,680,064 image first: over a minute and gigabytes. 100:1 costs at most 5 MP.
MAX_ASPECT_RATIO = 100

# Alpha is composited on this colour rather than dropped: the colour values
# stored under fully transparent pixels are arbitrary (often black), while a
# viewer shows a transparent logo or product shot on a light page.
ALPHA_BACKGROUND = (255, 255, 255)

# FFmpeg demuxers that are not videos: "image2" and the "*_pipe" ones read
# still images, "tty" renders text files as ANSI art.
_STILL_IMAGE_DEMUXERS = ("image2", "tty")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]
VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# warnings.catch_warnings() swaps process-wide state; overlapping uses from two
# threads can leave the wrong filters installed, so ours are serialised.
_warnings_lock = threading.Lock()


def describe_source(source: object) -> str:
    """The name an error message uses for `source`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes, {len(source)} B>"
    if isinstance(source, Image.Image):
        return f"<image {source.width}x{source.height} {source.mode}>"
    return os.fspath(source)


@contextmanager
def _open_binary(source: object, error: type[Exception]) -> Iterator[BinaryIO]:
    """A readable binary stream over a path or bytes-like `source`, known non-empty.

    Paths are streamed, not read whole: a decoder only reads what it needs.
    """
    name = describe_source(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise error(f"{name}: empty (0 bytes)")
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            stream = open(source, "rb")
        except OSError as exc:
            raise error(f"{name}: cannot read: {exc.strerror or exc}") from exc
        with stream:
            if not stream.read(1):
                raise error(f"{name}: empty file (0 bytes)")
            stream.seek(0)
            yield stream
    else:
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")


# --------------------------------------------------------------------- images


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) into an upright RGB image.

    Raises InvalidImageError for empty, non-image, truncated, zero-size or
    oversized (more than `max_pixels`) data. Pillow's own decompression-bomb
    limit (2 * PIL.Image.MAX_IMAGE_PIXELS, about 179 MP) still applies above
    ours.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return _normalise(source, name)
    with _open_binary(source, InvalidImageError) as stream:
        # Normalised while the file is open: EXIF may be read lazily from it.
        return _normalise(_decode_image(stream, name, max_pixels), name)


def check_dimensions(width: int, height: int, name: str, kind: str = "image", max_pixels: int | None = None,
                     error: type[Exception] = InvalidImageError) -> None:
    """Refuse a zero size, more than `max_pixels` (None: no limit) or a ratio over MAX_ASPECT_RATIO."""
    if width == 0 or height == 0:
        raise error(f"{name}: {kind} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise error(f"{name}: {kind} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (possible decompression bomb)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise error(f"{name}: {kind} is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the limit of "
                    f"{MAX_ASPECT_RATIO}:1 (resizing its short side to the model's input would make it huge)")


def image_header(source: Union[bytes, BinaryIO], name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image with only its header parsed (nothing decoded yet), size checked."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        image = _open_header(stream)
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{name}: image too large, possible decompression bomb ({exc})") from exc
    except Exception as exc:  # plugins raise SyntaxError, struct.error, ValueError ... on bad headers
        raise InvalidImageError(f"{name}: corrupt image header: {exc}") from exc
    check_dimensions(*image.size, name, image.format or "image", max_pixels)
    return image


def _normalise(image: Image.Image, name: str) -> Image.Image:
    check_dimensions(image.width, image.height, name)
    try:
        return _to_rgb(_upright(image))
    except (OSError, ValueError) as exc:  # e.g. a LAB TIFF: Pillow has no LAB->RGB
        raise InvalidImageError(f"{name}: cannot convert {image.mode} image to RGB: {exc}") from exc


def _decode_image(stream: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    # Truncated data raises in image.load() only while Pillow's process-wide
    # ImageFile.LOAD_TRUNCATED_IMAGES keeps its default, False; nothing in
    # this package sets it, and nothing else in the process should.
    image = image_header(stream, name, max_pixels)
    kind = image.format or "image"
    try:
        image.load()
    except OSError as exc:
        if "truncated" in str(exc):
            raise InvalidImageError(f"{name}: truncated {kind} ({exc})") from exc
        raise InvalidImageError(f"{name}: corrupt {kind} data: {exc}") from exc
    except Exception as exc:  # decoders also raise ValueError, SyntaxError, EOFError
        raise InvalidImageError(f"{name}: corrupt {kind} data: {exc}") from exc
    return image


def _open_header(stream: BinaryIO) -> Image.ImageFile.ImageFile:
    """Image.open (it parses the header only) without Pillow's size warning.

    Pillow warns about images over PIL.Image.MAX_IMAGE_PIXELS (and raises at
    twice that); callers apply their own, lower limit instead, so the user sees
    one typed error rather than a warning first.
    """
    stream.seek(0)
    with _warnings_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so phone photos are not sideways."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image  # exif_transpose would copy the pixels for nothing
        return ImageOps.exif_transpose(image)
    except Exception:  # orientation is a hint: a photo with broken EXIF is still a photo
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit_gray(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float grayscale image to 8 bits.

    Pillow's convert("L") clips these at 255 instead of scaling, which turns a
    normal 16-bit photo almost entirely white.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else values.max()
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:  # mode "I": 32-bit ints, usually holding 16-bit data
        top = 255.0 if values.max(initial=0) <= 255 else max(65535.0, values.max())
    scaled = np.clip(values / top * 255.0, 0.0, 255.0)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


# --------------------------------------------------------------------- videos


def video_frames(source: VideoSource, n: int = 16, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
                 max_seconds: float = DEFAULT_MAX_DECODE_SECONDS) -> list[Image.Image]:
    """Exactly `n` RGB frames sampled uniformly over the video's decoded frames.

    The frames at indices round(linspace(0, count - 1, n)) are kept, where
    `count` is the number of decodable frames; a video shorter than `n` frames
    repeats frames (the same object) so callers get a fixed batch size.
    Memory stays bounded: frames are decoded one by one and only the chosen
    ones are kept, downscaled as they are decoded (short side at most
    KEPT_FRAME_SHORT_SIDE, at most KEPT_FRAME_PIXELS; smaller frames are kept
    as decoded). The count comes from the container header when it has one;
    otherwise (or when the header turns out wrong) the video is decoded once
    more to count or re-pick.

    Raises InvalidVideoError for data with no video stream or no decodable
    frame, for a frame over `max_pixels`, for more than `max_frames` frames,
    and when decoding takes longer than `max_seconds`.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    name = describe_source(source)
    budget = _Budget(name, max_pixels, max_frames, max_seconds)
    with _open_binary(source, InvalidVideoError) as stream:
        count = _header_frame_count(stream, name, budget)
        if count == 0:
            count = _count_frames(stream, name, budget)
        picked, decoded = _pick_frames(stream, name, _uniform_indices(count, n), budget)
        if decoded != count:  # the header was wrong, or decoding stopped early
            picked, _ = _pick_frames(stream, name, _uniform_indices(decoded, n), budget)
    return picked


@dataclass
class _Budget:
    """The limits of one video_frames call: frame size, frame count, and its deadline."""

    name: str
    max_pixels: int
    max_frames: int
    max_seconds: float

    def __post_init__(self):
        self.deadline = time.monotonic() + self.max_seconds

    def check_count(self, frames: int, counted: str = "decoded") -> None:
        if frames > self.max_frames:
            raise InvalidVideoError(f"{self.name}: over {self.max_frames} frames ({counted}): "
                                    "too long a video to caption; cut it shorter")

    def check_frame(self, frame: av.VideoFrame, decoded: int) -> None:
        """Between frames: the count, the time spent, and this frame's size."""
        self.check_count(decoded)
        if time.monotonic() > self.deadline:
            raise InvalidVideoError(f"{self.name}: decoding took over {self.max_seconds:g} s "
                                    f"({decoded} frames decoded): too long or too costly a video to caption")
        check_dimensions(frame.width, frame.height, self.name, "frames", self.max_pixels, InvalidVideoError)


def _uniform_indices(count: int, n: int) -> list[int]:
    return np.round(np.linspace(0, count - 1, n)).astype(int).tolist()


@contextmanager
def _container(stream: BinaryIO, name: str) -> Iterator[av.container.InputContainer]:
    """The demuxed video, from the start of `stream`; it has a video stream."""
    stream.seek(0)
    try:
        container = av.open(stream, mode="r")
    except av.FFmpegError as exc:
        raise InvalidVideoError(f"{name}: not a video ({exc})") from exc
    with container:
        demuxer = container.format.name
        if demuxer in _STILL_IMAGE_DEMUXERS or demuxer.endswith("_pipe"):
            raise InvalidVideoError(f"{name}: a still image ({demuxer}), not a video")
        if not container.streams.video:
            raise InvalidVideoError(f"{name}: no video stream")
        if container.streams.video[0].codec_context is None:  # e.g. a truncated header: no codec to decode with
            raise InvalidVideoError(f"{name}: the video stream has no decodable codec (truncated or corrupt file?)")
        yield container


def _header_frame_count(stream: BinaryIO, name: str, budget: _Budget) -> int:
    """Frame count the container claims (0 if unknown); rejects oversized frames and too many frames."""
    with _container(stream, name) as container:
        video = container.streams.video[0]
        width, height = video.codec_context.width, video.codec_context.height
        if width and height:  # 0 when the header does not say; decoded frames are checked as they come
            check_dimensions(width, height, name, "frames", budget.max_pixels, InvalidVideoError)
        count = max(int(video.frames or 0), 0)
        budget.check_count(count, "the header's count")
        return count


def _decoded_frames(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """Frames of the first video stream, ending at the first decode error.

    Frames before a corrupt packet are still usable; the callers count what
    was decoded and sample over that instead of failing the whole video.
    """
    video = container.streams.video[0]
    video.thread_type = "AUTO"
    try:
        yield from container.decode(video)
    except av.FFmpegError:
        return


def _count_frames(stream: BinaryIO, name: str, budget: _Budget) -> int:
    count = 0
    with _container(stream, name) as container:
        for count, frame in enumerate(_decoded_frames(container), start=1):
            budget.check_frame(frame, count)
    if count == 0:
        raise InvalidVideoError(f"{name}: no decodable video frames")
    return count


def _pick_frames(stream: BinaryIO, name: str, indices: list[int],
                 budget: _Budget) -> tuple[list[Image.Image], int]:
    """The frames at `indices` (in order, repeats allowed) and the decoded count.

    Gives [] when the video has fewer frames than the largest index; the
    caller then picks again with the returned count.
    """
    wanted = set(indices)
    kept: dict[int, Image.Image] = {}
    decoded = 0
    with _container(stream, name) as container:
        for decoded, frame in enumerate(_decoded_frames(container), start=1):
            budget.check_frame(frame, decoded)
            if decoded - 1 in wanted:
                kept[decoded - 1] = _kept_image(frame)
    if decoded == 0:
        raise InvalidVideoError(f"{name}: no decodable video frames")
    if len(kept) < len(wanted):
        return [], decoded
    return [kept[i] for i in indices], decoded


def _kept_image(frame: av.VideoFrame) -> Image.Image:
    """The frame as RGB, scaled by FFmpeg (area averaging) straight from its decoded planes when it is
    larger than kept frames may be, so a full-size RGB copy never exists."""
    width, height = frame.width, frame.height
    scale = min(1.0, KEPT_FRAME_SHORT_SIDE / min(width, height), (KEPT_FRAME_PIXELS / (width * height)) ** 0.5)
    if scale == 1.0:
        return frame.to_image()  # RGB, as decoded
    return frame.to_image(width=max(1, round(width * scale)), height=max(1, round(height * scale)),
                          interpolation="AREA")


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost to sample (sample_frames); each is refused by name (VideoLimitError)."""

    max_seconds: float = 3600.0  # duration: the header's, and every decoded frame's time
    max_pixels: int = 3840 * 2160  # one frame's width x height (the resolution)
    max_samples: int = 7200  # frames sampled (what is embedded)
    max_decoded_bytes: int = 64 << 30  # raw bytes of all decoded frames (every frame is decoded, sampled or not)
    max_decode_seconds: float = 1800.0  # wall clock (decoding runs in a thread nothing can interrupt)


class VideoLimitError(InvalidVideoError):
    """A video over one of VideoLimits; `limit` names it."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


@dataclass
class SampledFrame:
    time_s: float  # presentation time of the decoded frame taken
    image: Image.Image  # RGB, downscaled as video_frames keeps frames (_kept_image)


def sample_frames(source: VideoSource, every_s: float, limits: VideoLimits = VideoLimits(),
                  start_s: float = 0.0) -> Generator[SampledFrame, None, float]:
    """Frames at a fixed rate, streamed: the first decoded frame at or after each multiple of `every_s` seconds
    (by presentation time, so variable frame rates sample evenly). Nothing but the current frame is held.
    After the last frame, the generator's return value (StopIteration.value) is the video's end time (the last
    frame's time plus its duration). A decode error ends the frames where it happens (a truncated file gives
    the frames before the cut); no decodable frame at all, a file that is not a video, or a limit passed
    raises InvalidVideoError (VideoLimitError naming the limit).

    `start_s`: begin at a sampled frame's time (a seek to the keyframe before it, then frames from it on):
    the frames sampled from there are the ones a decode from the start samples, as sampling restarts at each
    sampled frame's time."""
    if not every_s > 0:
        raise ValueError(f"every_s must be positive, got {every_s}")
    name = describe_source(source)
    deadline = time.monotonic() + limits.max_decode_seconds
    with _open_binary(source, InvalidVideoError) as stream, _container(stream, name) as container:
        video = container.streams.video[0]
        _check_video_header(video, container, name, limits)
        decoded_bytes, sampled, next_t, end = 0, 0, max(0.0, start_s), 0.0
        rate = float(video.average_rate or video.guessed_rate or 25)
        if next_t > 0:
            _seek(container, video, next_t)
        for index, frame in enumerate(_decoded_frames(container)):
            t = float(frame.time) if frame.time is not None else index / rate
            end = max(end, t + (float(frame.duration * frame.time_base) if frame.duration and frame.time_base
                                else 1 / rate))
            decoded_bytes += sum(plane.buffer_size for plane in frame.planes)
            _check_frame_limits(frame, t, decoded_bytes, deadline, name, limits)
            if t + 1e-6 < next_t:
                continue
            sampled += 1
            if sampled > limits.max_samples:
                raise VideoLimitError(f"{name}: more than {limits.max_samples} frames sampled (the limit "
                                      "max_samples): sample less often or cut the video shorter", "max_samples")
            next_t = (int(t / every_s + 1e-6) + 1) * every_s
            yield SampledFrame(t, _kept_image(frame))
        if sampled == 0:
            raise InvalidVideoError(f"{name}: no decodable video frames")
        return end


def _seek(container, video, time_s: float) -> None:
    """To the keyframe at or before `time_s` (decoding goes on from there); a file that cannot seek decodes
    from its start, which samples the same frames, later."""
    try:
        if video.time_base:
            container.seek(int(time_s / video.time_base), stream=video)
        else:
            container.seek(int(time_s * av.time_base))
    except av.FFmpegError:
        pass  # not seekable: decoding stays at the start


def _check_video_header(video, container, name: str, limits: VideoLimits) -> None:
    width, height = video.codec_context.width, video.codec_context.height
    if width and height and width * height > limits.max_pixels:
        raise VideoLimitError(f"{name}: frames are {width}x{height} = {width * height} pixels, over the limit "
                              f"max_pixels = {limits.max_pixels}", "max_pixels")
    duration = (float(video.duration * video.time_base) if video.duration and video.time_base
                else (container.duration or 0) / 1_000_000)
    if duration > limits.max_seconds:
        raise VideoLimitError(f"{name}: {duration:.1f} s long (its header), over the limit max_seconds = "
                              f"{limits.max_seconds:g} s", "max_seconds")


def _check_frame_limits(frame: av.VideoFrame, t: float, decoded_bytes: int, deadline: float, name: str,
                        limits: VideoLimits) -> None:
    if frame.width * frame.height > limits.max_pixels:
        raise VideoLimitError(f"{name}: a frame is {frame.width}x{frame.height} = {frame.width * frame.height} "
                              f"pixels, over the limit max_pixels = {limits.max_pixels}", "max_pixels")
    check_dimensions(frame.width, frame.height, name, "frames", None, InvalidVideoError)
    if t > limits.max_seconds:
        raise VideoLimitError(f"{name}: a frame at {t:.1f} s, past the limit max_seconds = {limits.max_seconds:g} s",
                              "max_seconds")
    if decoded_bytes > limits.max_decoded_bytes:
        raise VideoLimitError(f"{name}: over {limits.max_decoded_bytes} bytes of decoded frames (the limit "
                              "max_decoded_bytes)", "max_decoded_bytes")
    if time.monotonic() > deadline:
        raise VideoLimitError(f"{name}: decoding took over {limits.max_decode_seconds:g} s (the limit "
                              "max_decode_seconds)", "max_decode_seconds")


def is_video(source: ImageSource) -> bool:
    """Whether `source` holds a video (True) rather than a still image (False).

    Sniffs the content, never the extension: anything Pillow can identify
    (including animated GIF/WebP) counts as an image; otherwise it is a video
    when FFmpeg finds a video stream in a container other than its
    single-image demuxers. Unreadable or unrecognised data gives False, so
    that load_image() reports the error.
    """
    if isinstance(source, Image.Image):
        return False
    try:
        with _open_binary(source, InvalidVideoError) as stream:
            if _pillow_identifies(stream):
                return False
            with _container(stream, describe_source(source)):
                return True
    except InvalidVideoError:
        return False


def _pillow_identifies(stream: BinaryIO) -> bool:
    """Whether Pillow recognises the header (it reads no pixel data)."""
    try:
        _open_header(stream)
        return True
    except Image.DecompressionBombError:
        return True  # an oversized image: load_image() says so
    except Exception:
        return False


# --- folders of images -------------------------------------------------------------------
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"})


def image_files(directory: Union[str, os.PathLike]) -> list[Path]:
    """Image files under `directory` (searched recursively, by suffix), sorted so runs visit them in the same order."""
    return _files_with(directory, IMAGE_SUFFIXES)


def video_files(directory: Union[str, os.PathLike]) -> list[Path]:
    """Video files under `directory` (recursively, by suffix), sorted."""
    return _files_with(directory, VIDEO_SUFFIXES)


def _files_with(directory: Union[str, os.PathLike], suffixes: frozenset[str]) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise InvalidInputError(f"{directory}: not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def video_seconds(source: VideoSource) -> float:
    """A video's duration as its header says (0.0 when it does not say, or the file is not a video)."""
    try:
        with _open_binary(source, InvalidVideoError) as stream, _container(stream, describe_source(source)) as c:
            video = c.streams.video[0]
            if video.duration and video.time_base:
                return float(video.duration * video.time_base)
            return (c.duration or 0) / 1_000_000
    except InvalidVideoError:
        return 0.0
