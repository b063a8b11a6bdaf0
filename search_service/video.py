"""AddVideos: a video becomes scenes, each an item searched like an image (README "Video").

One video at a time per stream, streamed through three stages so memory does not grow with its length:
  decode (a thread: PyAV, coca.media.sample_frames at `every_s`; each sampled frame as PNG for the encoder
  and a small JPEG keyframe candidate), a chunk of FRAMES_PER_CALL frames at a time, the next chunk decoding
  while the previous one embeds;
  embed (Triton's image encoder: ClassEmbeddings, and ImageEmbeddings when scenes are captioned);
  cut (search_service/scenes.py), captioning each scene as it closes (its frames' mean ImageEmbeddings
  through the decoder, at most caption_workers at once).
The video row, its bytes (content-addressed, once) and all its scenes are then committed in one transaction.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image

from coca import media
from coca.settings import SamplingParams

from .pb import search_pb2 as pb
from .query import VIDEO_ID
from .scenes import Scene, SceneCutter, SceneSettings
from .store import NewItem, NewScene, NewVideo, SceneRow, Video, default_id

FRAMES_PER_CALL = 16  # sampled frames embedded by one Triton request (and decoded ahead of it)
SCENES_AWAITING_CAPTION = 16  # closed scenes whose captions are not made yet, at most, before decoding waits
THUMBNAIL_SIDE = 320  # keyframes: long side at most this many pixels, JPEG
THUMBNAIL_QUALITY = 85


@dataclass
class VideoSource:
    """A validated AddVideos item, ready to decode."""

    source: Union[bytes, Path]  # the bytes sent, or a server-side file (decoded from there, never copied)
    name: str  # how errors name it
    sha256: str
    uri: str
    id: str
    metadata: dict[str, str]
    settings: SceneSettings
    caption: Optional[SamplingParams]  # caption each scene with these (None: no captions)

    @property
    def keep(self) -> Optional[bytes]:
        return self.source if isinstance(self.source, bytes) else None


def settings_from_pb(options: pb.VideoOptions) -> SceneSettings:
    """The scene settings a request asks for (defaults where unset); ValueError naming a bad one."""
    defaults = SceneSettings()
    given = {name: getattr(options, field) for name, field in (("every_s", "every_s"), ("threshold", "scene_threshold"),
                                                              ("min_scene_s", "min_scene_s"), ("max_scene_s", "max_scene_s"))
             if options.HasField(field)}
    settings = SceneSettings(**{**defaults.__dict__, **{k: float(v) for k, v in given.items()}})
    problem = settings.problem()
    if problem is not None:
        raise ValueError(f"options: {problem}")
    return settings


def scene_id(video_id: str, index: int) -> str:
    return f"{video_id}.scene{index}"


# ---------------------------------------------------------------- decoding (a thread)
@dataclass
class Frame:
    time_s: float
    png: bytes  # what the image encoder reads (lossless: the frame's pixels exactly)
    thumbnail: bytes  # JPEG keyframe candidate


def frame_chunks(source: Union[bytes, Path], every_s: float, limits: media.VideoLimits,
                 size: int = FRAMES_PER_CALL) -> Iterator[Union[list[Frame], float]]:
    """Chunks of up to `size` sampled frames, then the video's end time (a float) last."""
    frames = media.sample_frames(source, every_s, limits)
    chunk: list[Frame] = []
    while True:
        try:
            sampled = next(frames)
        except StopIteration as stop:
            if chunk:
                yield chunk
            yield float(stop.value)
            return
        chunk.append(Frame(sampled.time_s, encoded(sampled.image, "PNG"), thumbnail(sampled.image)))
        if len(chunk) == size:
            yield chunk
            chunk = []


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def thumbnail(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return encoded(small, "JPEG", quality=THUMBNAIL_QUALITY)


# ---------------------------------------------------------------- one video
EncodeFrames = Callable[[list[bytes], bool], Awaitable[tuple[np.ndarray, Optional[np.ndarray]]]]
CaptionEmbeddings = Callable[[np.ndarray, SamplingParams], Awaitable[str]]


@dataclass
class Cut:
    """What decoding, embedding and cutting one video gave."""

    scenes: list[Scene]
    captions: list[Optional[str]]
    caption_error: str
    duration_s: float
    sampled: int


async def cut_video(video: VideoSource, limits: media.VideoLimits, encode: EncodeFrames,
                    caption: CaptionEmbeddings, caption_workers: int) -> Cut:
    """Decode, embed and cut `video`; captions (when asked) made as scenes close. Raises InvalidVideoError for a
    video that cannot be read or passes a limit; a caption that fails is the Cut's caption_error."""
    chunks = frame_chunks(video.source, video.settings.every_s, limits)
    cutter = SceneCutter(video.settings)
    scenes: list[Scene] = []
    captions: list[asyncio.Task] = []
    room = asyncio.Semaphore(caption_workers)
    sampled = 0

    def closed(done: list[Scene]) -> None:
        for scene in done:
            scenes.append(scene)
            if video.caption is not None:
                captions.append(asyncio.ensure_future(_caption_scene(scene, caption, video.caption, room)))

    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks))
    try:
        while True:
            chunk = await pending
            pending = None
            if isinstance(chunk, float):
                closed(cutter.finish(chunk))
                end = chunk
                break
            pending = asyncio.ensure_future(asyncio.to_thread(next, chunks))  # decode on while this chunk embeds
            await _captions_caught_up(captions)
            classes, images = await encode([f.png for f in chunk], video.caption is not None)
            sampled += len(chunk)
            for i, frame in enumerate(chunk):
                closed(cutter.add(frame.time_s, classes[i], frame.thumbnail, None if images is None else images[i]))
        made = await asyncio.gather(*captions, return_exceptions=True)
    except BaseException as exc:
        for task in captions:
            task.cancel()
        if isinstance(exc, media.InvalidVideoError) and isinstance(video.source, Path):
            exc.args = (str(exc).replace(str(video.source), video.name),)  # as the client named it: no server path
        raise
    finally:
        if pending is not None:  # the decoding thread finishes its chunk before the generator can be closed
            await asyncio.gather(pending, return_exceptions=True)
        chunks.close()
    texts = [None if isinstance(m, BaseException) else m for m in made] if captions else [None] * len(scenes)
    failure = next((m for m in made if isinstance(m, BaseException)), None)
    return Cut(scenes, texts, "" if failure is None else f"{type(failure).__name__}: {failure}", end, sampled)


async def _captions_caught_up(captions: list[asyncio.Task]) -> None:
    """Wait while more than SCENES_AWAITING_CAPTION scenes wait for their captions: each holds its mean
    ImageEmbeddings until then, so captions slower than decoding would otherwise grow memory with the video."""
    while len(waiting := [task for task in captions if not task.done()]) > SCENES_AWAITING_CAPTION:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)


async def _caption_scene(scene: Scene, caption: CaptionEmbeddings, params: SamplingParams,
                         room: asyncio.Semaphore) -> str:
    embeddings, scene.image_embeddings = scene.image_embeddings, None  # held only until captioned
    async with room:
        return await caption(embeddings, params)


_HALF_MS = 0.0005  # scene times are stored to the millisecond


async def scene_image_embeddings(source: Union[bytes, Path], every_s: float, start_s: float, end_s: float,
                                 limits: media.VideoLimits, encode: EncodeFrames) -> np.ndarray:
    """The mean ImageEmbeddings of a stored scene's sampled frames (its caption's input, as at ingest), decoded
    again from the video: from the keyframe before the scene to its end, FRAMES_PER_CALL frames at a time
    (memory: one chunk and the running sum), under the video limits."""
    frames = media.sample_frames(source, every_s, limits, start_s=max(0.0, start_s - _HALF_MS))
    ended = False

    def next_chunk() -> list[bytes]:
        nonlocal ended
        chunk: list[bytes] = []
        while not ended and len(chunk) < FRAMES_PER_CALL:
            frame = next(frames, None)
            ended = frame is None or frame.time_s >= end_s - _HALF_MS
            if not ended:
                chunk.append(encoded(frame.image, "PNG"))
        return chunk

    total, count = 0.0, 0
    try:
        while chunk := await asyncio.to_thread(next_chunk):
            _, images = await encode(chunk, True)
            total, count = total + images.sum(0, dtype=np.float64), count + len(chunk)
    finally:
        frames.close()
    if not count:
        raise media.InvalidVideoError(f"no frames decoded between {start_s} s and {end_s} s")
    return (total / count).astype(np.float32)


def new_video(video: VideoSource, cut: Cut) -> tuple[NewVideo, list[NewScene]]:
    """The rows to commit: the video, and one item per scene carrying the video fields in its metadata."""
    video_id = video.id or default_id(video.sha256)
    duration = _ms(cut.duration_s)
    row = NewVideo(video.sha256, video.uri, video_id, video.metadata, duration, cut.sampled, video.keep,
                   video.settings.every_s)
    scenes = []
    for scene, text in zip(cut.scenes, cut.captions):
        start, end = _ms(scene.start_s), _ms(scene.end_s)
        fields = {VIDEO_ID: video_id, "start_s": repr(start), "end_s": repr(end), "video_duration_s": repr(duration)}
        sha = hashlib.sha256(f"{video.sha256}:scene:{scene.index}".encode()).hexdigest()
        item = NewItem(sha256=sha, uri=video.uri, embedding=scene.embedding, id=scene_id(video_id, scene.index),
                       metadata={**video.metadata, **fields})
        scenes.append(NewScene(item, scene.index, start, end, scene.keyframe, text))
    return row, scenes


def _ms(seconds: float) -> float:
    """Times as stored and shown: to the millisecond (the metadata's text and the numbers agree exactly)."""
    return round(seconds, 3)


# ---------------------------------------------------------------- answers
def video_info(duration_s: float, sampled: int, video_id: str, scenes: list[SceneRow]) -> pb.VideoInfo:
    return pb.VideoInfo(duration_s=duration_s, frames_sampled=sampled, scenes=[
        pb.SceneInfo(id=s.id, video_id=video_id, index=s.index, start_s=s.start_s, end_s=s.end_s,
                     caption=s.caption or "") for s in scenes])


def stored_video_info(video: Video) -> pb.VideoInfo:
    return video_info(video.duration_s, video.sampled, video.id, video.scenes)


def scene_of(item_id: str, metadata: dict[str, str], caption: Optional[str]) -> Optional[pb.SceneInfo]:
    """A scene item's place in its video, from its metadata (None for an image)."""
    if VIDEO_ID not in metadata:
        return None
    try:
        start, end = float(metadata["start_s"]), float(metadata["end_s"])
    except (KeyError, ValueError):
        return None
    return pb.SceneInfo(id=item_id, video_id=metadata[VIDEO_ID], start_s=start, end_s=end, caption=caption or "")




# ---------------------------------------------------------------- reading a stored video (ReadVideo)
MAX_READ_BYTES = 4 << 20  # one ReadVideo answer at most (a player reads a long video a range at a time)
_CONTAINERS = [(4, b"ftyp", "video/mp4"), (0, b"OggS", "video/ogg"), (0, b"RIFF", "video/x-msvideo"),
               (0, b"\x1a\x45\xdf\xa3", "video/x-matroska")]  # EBML: Matroska, or WebM if its DocType says so


class OutOfRange(ValueError):
    """An offset at or past the video's end."""


def read_slice(path: Path, offset: int, length: int) -> pb.VideoBytes:
    """Bytes [offset, offset + length) of the video file at `path` (fewer at its end), its size and type.
    OutOfRange for an offset at or past the end; OSError when the file is gone."""
    with open(path, "rb") as file:
        total = os.fstat(file.fileno()).st_size
        if offset >= total:
            raise OutOfRange(f"offset {offset} is at or past the video's end ({total} bytes)")
        head = file.read(64)
        file.seek(offset)
        data = file.read(min(length, MAX_READ_BYTES))
    return pb.VideoBytes(data=data, offset=offset, total_bytes=total, content_type=content_type(head))


def content_type(head: bytes) -> str:
    """A video's media type from its first bytes (what a browser needs to play it)."""
    kind = next((kind for at, magic, kind in _CONTAINERS if head[at:at + len(magic)] == magic),
                "application/octet-stream")
    return "video/webm" if kind == "video/x-matroska" and b"webm" in head else kind
