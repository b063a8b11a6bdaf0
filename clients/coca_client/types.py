"""Typed results (plain dataclasses, no protobuf in sight) and the inputs that build requests."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import grpc
import numpy as np

from search_service.pb import search_pb2 as pb

from .errors import SearchError, error_class, status_code

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike]  # encoded bytes, or a local file to read


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity
    uri: str = ""
    caption: str = ""
    caption_error: str = ""  # why no caption could be made (only with with_captions)
    metadata: dict[str, str] = field(default_factory=dict)
    added_at: float = 0.0  # when the item was stored (Unix seconds)
    vector_rank: int = 0  # mode="keyword"/"hybrid": where each list placed it (1 = first; 0 = not found by it)
    keyword_rank: int = 0
    keyword_score: float = 0.0
    video_id: str = ""  # a video scene's hit: its video ("" for an image) and where in it (seconds)
    start_s: float = 0.0
    end_s: float = 0.0

    @classmethod
    def from_pb(cls, hit: pb.Hit) -> "Hit":
        return cls(hit.id, float(hit.score), hit.uri, hit.caption, hit.caption_error, dict(hit.metadata),
                   hit.added_at, hit.vector_rank, hit.keyword_rank, hit.keyword_score, hit.video_id, hit.start_s,
                   hit.end_s)


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    searched: int  # items in the index
    next_page_token: str = ""  # pass as page_token (same query otherwise) for the next page; "" when none
    answered_by: str = ""  # the model generation that ranked it (README "Reindex to new weights")

    @classmethod
    def from_pb(cls, response: pb.SearchResponse) -> "SearchResult":
        return cls([Hit.from_pb(h) for h in response.hits], int(response.searched), response.next_page_token,
                   response.answered_by)

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]


class Outcome(str, enum.Enum):
    ADDED = "added"  # new content, committed
    DUPLICATE = "duplicate"  # this content was already indexed (under `id`)
    FAILED = "failed"  # nothing stored; see `error`
    NEAR_DUPLICATE = "near_duplicate"  # like `near_duplicate` (stored under `id`, unless skipped: then no id)


_OUTCOMES = {pb.AddImageResult.ADDED: Outcome.ADDED, pb.AddImageResult.DUPLICATE: Outcome.DUPLICATE,
             pb.AddImageResult.FAILED: Outcome.FAILED, pb.AddImageResult.NEAR_DUPLICATE: Outcome.NEAR_DUPLICATE}


@dataclass(frozen=True)
class ItemError:
    code: grpc.StatusCode
    message: str

    def exception(self) -> SearchError:
        return error_class(self.code)(self.code, self.message, "AddImages")

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclass(frozen=True)
class AddResult:
    index: int  # position of the item in what was passed to add()
    outcome: Outcome
    id: str = ""
    content_sha256: str = ""
    error: Optional[ItemError] = None
    near_duplicate: Optional[tuple[str, float]] = None  # (id, cosine similarity) of the stored item it resembles
    caption: str = ""  # with AddItem(caption=True): the caption stored with it
    caption_error: str = ""  # ... or why none was made (the item is stored all the same)

    @classmethod
    def from_pb(cls, result: pb.AddImageResult, offset: int = 0) -> "AddResult":
        error = None
        if result.HasField("error") and (result.error.code or result.error.message):
            error = ItemError(status_code(result.error.code), result.error.message)
        near = (result.near_duplicate.id, result.near_duplicate.score) if result.HasField("near_duplicate") else None
        return cls(int(result.index) + offset, _OUTCOMES.get(result.outcome, Outcome.FAILED), result.id,
                   result.content_sha256, error, near, result.caption, result.caption_error)

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAILED


@dataclass(frozen=True)
class Caption:
    text: str
    tokens: list[int]
    logprobs: list[float]

    @classmethod
    def from_pb(cls, response: pb.CaptionResponse) -> "Caption":
        return cls(response.text, list(response.tokens), list(response.logprobs))


@dataclass(frozen=True)
class CaptionChunk:
    """One message of a caption stream: `piece` is what `text` gained; the last (`done`) holds the Caption."""

    piece: str
    text: str
    token_count: int
    done: bool = False
    caption: Optional[Caption] = None

    @classmethod
    def from_pb(cls, chunk: pb.CaptionChunk) -> "CaptionChunk":
        return cls(chunk.piece, chunk.text, chunk.token_count, chunk.done,
                   Caption.from_pb(chunk.caption) if chunk.done else None)


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    similarity: float


@dataclass(frozen=True)
class TextScore:
    text: str
    distance: float  # cosine distance, 1 - similarity: smaller is closer


@dataclass(frozen=True)
class Item:
    id: str
    content_sha256: str
    uri: str
    metadata: dict[str, str]
    caption: str
    created_at: float
    updated_at: float
    image: Optional[bytes] = None  # only when asked for (include_image=True); a scene's: its keyframe
    embedding: Optional[np.ndarray] = None  # only when asked for (include_embedding=True)
    scene: Optional["Scene"] = None  # the item is a video scene: where in its video
    video: Optional["Video"] = None  # the id names a video: its scenes

    @classmethod
    def from_pb(cls, item: pb.Item, include_image: bool, include_embedding: bool) -> "Item":
        return cls(item.id, item.content_sha256, item.uri, dict(item.metadata), item.caption, item.created_at,
                   item.updated_at, bytes(item.image) if include_image else None,
                   np.asarray(item.embedding, dtype=np.float32) if include_embedding else None,
                   Scene.from_pb(item.scene) if item.HasField("scene") else None,
                   Video.from_pb(item.video) if item.HasField("video") else None)


@dataclass(frozen=True)
class Scene:
    id: str  # the scene's item id
    video_id: str
    index: int  # its place in the video (from 0; in Video.scenes)
    start_s: float
    end_s: float
    caption: str = ""

    @classmethod
    def from_pb(cls, scene: pb.SceneInfo) -> "Scene":
        return cls(scene.id, scene.video_id, int(scene.index), scene.start_s, scene.end_s, scene.caption)


@dataclass(frozen=True)
class Video:
    duration_s: float
    frames_sampled: int
    scenes: list[Scene]

    @classmethod
    def from_pb(cls, video: pb.VideoInfo) -> "Video":
        return cls(video.duration_s, int(video.frames_sampled), [Scene.from_pb(s) for s in video.scenes])


@dataclass(frozen=True)
class VideoResult:
    """What AddVideos said of one video."""

    index: int  # its position in what was passed to add_videos()
    outcome: Outcome  # ADDED, DUPLICATE or FAILED
    id: str = ""
    content_sha256: str = ""
    error: Optional[ItemError] = None
    video: Optional[Video] = None
    caption_error: str = ""

    @classmethod
    def from_pb(cls, result: pb.AddVideoResult) -> "VideoResult":
        error = None
        if result.HasField("error") and (result.error.code or result.error.message):
            error = ItemError(status_code(result.error.code), result.error.message)
        return cls(int(result.index), _OUTCOMES.get(result.outcome, Outcome.FAILED), result.id, result.content_sha256,
                   error, Video.from_pb(result.video) if result.HasField("video") else None, result.caption_error)


def video_options(every_s: Optional[float] = None, scene_threshold: Optional[float] = None,
                  min_scene_s: Optional[float] = None, max_scene_s: Optional[float] = None,
                  caption: bool = False) -> pb.VideoOptions:
    given = dict(every_s=every_s, scene_threshold=scene_threshold, min_scene_s=min_scene_s, max_scene_s=max_scene_s)
    return pb.VideoOptions(caption=caption, **{k: v for k, v in given.items() if v is not None})


def video_requests(videos: Iterable[Union[bytes, str, os.PathLike]], metadata: Optional[dict[str, str]],
                   server_paths: bool, options: Optional[pb.VideoOptions]) -> Iterator[pb.AddVideoRequest]:
    """AddVideos requests, one video at a time (a local file is read when the stream gets to it)."""
    for video in videos:
        request = pb.AddVideoRequest(metadata=metadata or {}, options=options)
        if isinstance(video, (bytes, bytearray)):
            request.video = bytes(video)
        elif server_paths:
            request.path = os.path.abspath(video)
        else:
            request.video, request.uri = Path(video).read_bytes(), os.path.abspath(video)
        yield request


@dataclass(frozen=True)
class VideoSlice:
    """Bytes of a stored video (ReadVideo): data starts at `offset`; the whole video is `total_bytes` long."""

    data: bytes
    offset: int
    total_bytes: int
    content_type: str

    @classmethod
    def from_pb(cls, reply: pb.VideoBytes) -> "VideoSlice":
        return cls(reply.data, int(reply.offset), int(reply.total_bytes), reply.content_type)


@dataclass(frozen=True)
class ListPage:
    items: list["Item"]
    next_page_token: str  # "" on the last page
    total: int  # items passing the conditions, on all pages

    @classmethod
    def from_pb(cls, response: pb.ListResponse, include_embeddings: bool) -> "ListPage":
        return cls([Item.from_pb(i, False, include_embeddings) for i in response.items], response.next_page_token,
                   int(response.total))


@dataclass(frozen=True)
class DuplicateGroup:
    ids: list[str]
    pairs: list[tuple[str, str, float]]  # (a, b, cosine similarity), most similar first


@dataclass(frozen=True)
class DuplicatePage:
    groups: list[DuplicateGroup]  # largest first
    next_page_token: str
    total_groups: int

    @classmethod
    def from_pb(cls, response: pb.FindDuplicatesResponse) -> "DuplicatePage":
        groups = [DuplicateGroup(list(g.ids), [(p.a, p.b, p.score) for p in g.pairs]) for g in response.groups]
        return cls(groups, response.next_page_token, int(response.total_groups))


@dataclass(frozen=True)
class TritonEndpoint:
    """One Triton endpoint of the service, as its Stats show it."""

    address: str
    healthy: bool  # in rotation
    in_flight: int
    calls: int
    outages: int  # times taken out of rotation
    last_error: str
    down_seconds: float

    @classmethod
    def from_pb(cls, e: pb.TritonEndpoint) -> "TritonEndpoint":
        return cls(**{f.name: getattr(e, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Stats:
    count: int
    indexed: int
    index_type: str
    index_active: str
    model: str
    pretrained: str
    embedding_dim: int
    last_sequence: int
    snapshot_sequence: int
    triton_ready: bool
    triton_endpoints: tuple[TritonEndpoint, ...] = ()
    repository_id: str = ""  # the export (weights hash) the service's Triton serves
    accepts_embeddings: bool = False  # AddItem.embedding is taken (service started with --accept-embeddings)
    captions_pending_retry: int = 0  # AddItem(caption=True) captions that failed, waiting for the retry job
    captions_retried_ok: int = 0  # made by the retry job since the service started
    captions_given_up: int = 0  # items whose retries ran out
    generation: int = 0  # the model generation searches answer from (README "Reindex to new weights")
    answered_by: str = ""  # that generation and its model
    reindex: str = ""  # a generation being built, and how far ("" when none)
    old_generation: str = ""  # the one kept for rollback ("" when none)
    captions_by_old_models: int = 0  # captions an earlier generation's decoder made (kept)

    @classmethod
    def from_pb(cls, s: pb.StatsResponse) -> "Stats":
        values = {f.name: getattr(s, f.name) for f in fields(cls)}
        values["triton_endpoints"] = tuple(TritonEndpoint.from_pb(e) for e in s.triton_endpoints)
        return cls(**values)


@dataclass(frozen=True)
class BackupSummary:
    out: str  # the backup folder on the service's machine
    items: int
    blobs: int  # image files the backup holds
    blobs_copied: int  # of those, copied by this run (the rest were there from an earlier backup into the folder)
    bytes_copied: int
    sequence: int  # the store's change sequence the backup covers
    seconds: float

    @classmethod
    def from_pb(cls, s: pb.BackupSummary) -> "BackupSummary":
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class BackupProgress:
    phase: str  # "blobs" (a Milvus collection's: "items") while copying; "done" on the last one
    done: int
    total: int
    summary: Optional[BackupSummary] = None  # on the last one

    @classmethod
    def from_pb(cls, p: pb.BackupProgress) -> "BackupProgress":
        summary = BackupSummary.from_pb(p.summary) if p.HasField("summary") else None
        return cls(p.phase, p.done, p.total, summary)


@dataclass(frozen=True)
class ReindexProgress:
    phase: str  # "embedding", "switching", then "done"
    done: int  # items of the new generation embedded so far
    total: int  # live items
    rate: float  # items per second in this run
    eta_seconds: float
    generation: int  # the generation being built (switched to, when "done")
    answered_by: str = ""  # when "done": the generation searches answer from now

    @classmethod
    def from_pb(cls, p: pb.ReindexProgress) -> "ReindexProgress":
        return cls(**{f.name: getattr(p, f.name) for f in fields(cls)})


# ---------------------------------------------------------------- inputs
@dataclass
class AddItem:
    """One image to index: `image` (bytes, or a local file whose bytes are sent) or `path` (a file on
    the server, under one of its --root folders). Same content twice gives the same id.

    `embedding`: the image's unit embedding made on a Triton serving export `repository_id` (Stats says
    which one the service's Triton serves); only a service started with --accept-embeddings takes it."""

    image: Optional[ImageInput] = None
    path: Optional[str] = None
    id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    uri: str = ""  # a label stored with `image` items (e.g. the file name)
    near_duplicate_threshold: Optional[float] = None  # report NEAR_DUPLICATE at or above this cosine similarity
    skip_near_duplicates: bool = False  # ... and do not store it
    caption: bool = False  # caption it as part of the add (AddResult.caption)
    embedding: Optional[np.ndarray] = None
    repository_id: str = ""

    def to_pb(self) -> pb.AddImageRequest:
        request = pb.AddImageRequest(id=self.id, metadata=self.metadata, uri=self.uri, options=pb.AddOptions(
            near_duplicate_threshold=self.near_duplicate_threshold, skip_near_duplicates=self.skip_near_duplicates,
            caption=self.caption))
        if self.embedding is not None:
            request.embedding.values.extend(np.asarray(self.embedding, np.float32).reshape(-1).tolist())
            request.embedding.repository_id = self.repository_id
        if self.path is not None:
            request.path = str(self.path)
        elif self.image is not None:
            request.image = read_image(self.image)
            if not self.uri and isinstance(self.image, (str, os.PathLike)):
                request.uri = os.path.abspath(self.image)
        return request


@dataclass
class Sampling:
    """Caption settings; None leaves the server's default (greedy, 25 tokens)."""

    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    num_beams: Optional[int] = None
    num_beam_groups: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    seed: Optional[int] = None

    def to_pb(self) -> pb.SamplingSettings:
        return pb.SamplingSettings(**{f.name: getattr(self, f.name) for f in fields(self)
                                      if getattr(self, f.name) is not None})


def read_image(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def as_add_item(item) -> AddItem:
    if isinstance(item, AddItem):
        return item
    if isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike)):
        return AddItem(image=item)
    raise TypeError(f"add() takes AddItem, bytes or a file path, not {type(item).__name__}")


MAX_FIND_HASHES = 1024  # the server's limit per FindContent


def find_content_requests(hashes: Sequence[str]) -> list[pb.FindContentRequest]:
    """FindContent requests covering `hashes` in order, each within the server's limit."""
    return [pb.FindContentRequest(content_sha256=hashes[i : i + MAX_FIND_HASHES])
            for i in range(0, len(hashes), MAX_FIND_HASHES)]


Bound = Union[str, float, int]  # a number, or a date as ISO 8601 text ("2024-05-01", "2024-05-01T12:00:00Z")


@dataclass(frozen=True)
class Condition:
    """One condition of a search or listing: give one of `equals`, `any_of`, or range bounds (on added_at or
    a field the service's schema declares number/date); `negate` keeps the items that fail it.

        Condition("colour", any_of=["red", "blue"]), Condition("year", gte=2000, lt=2010),
        Condition("added_at", gte="2024-05-01"), Condition("album", equals="trip", negate=True)
    """

    field: str
    equals: Optional[str] = None
    any_of: Optional[Sequence[str]] = None
    gte: Optional[Bound] = None
    gt: Optional[Bound] = None
    lte: Optional[Bound] = None
    lt: Optional[Bound] = None
    negate: bool = False

    OPERATORS = ("!=", ">=", "<=", "=", ">", "<")  # longest first
    BOUNDS = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt"}

    @classmethod
    def parse(cls, text: str) -> "Condition":
        """From the command line's form: FIELD=V, FIELD!=V, FIELD=A|B (any of; != none of), FIELD>=V, FIELD>V,
        FIELD<=V, FIELD<V (the first operator after the field name); ValueError naming `text` otherwise."""
        at = min(((text.find(op), -len(op), op) for op in cls.OPERATORS if text.find(op) > 0), default=None)
        if at is None:
            raise ValueError(f"{text[:100]!r}: write FIELD=V, FIELD!=V, FIELD=A|B, FIELD>=V, FIELD>V, FIELD<=V or FIELD<V")
        op = at[2]
        field, value = text[:at[0]], text[at[0] + len(op):]
        if op in cls.BOUNDS:
            return cls(field, **{cls.BOUNDS[op]: value})
        values = value.split("|")
        if len(values) > 1:
            return cls(field, any_of=values, negate=op == "!=")
        return cls(field, equals=value, negate=op == "!=")

    def to_pb(self) -> pb.Condition:
        condition = pb.Condition(field=self.field, negate=self.negate)
        bounds = {name: str(getattr(self, name)) for name in ("gte", "gt", "lte", "lt") if getattr(self, name) is not None}
        if sum((self.equals is not None, self.any_of is not None, bool(bounds))) != 1:
            raise ValueError(f"condition on {self.field!r}: give one of equals, any_of or range bounds")
        if self.equals is not None:
            condition.equals = self.equals
        elif self.any_of is not None:
            condition.any_of.values.extend(self.any_of)
        else:
            condition.range.CopyFrom(pb.Range(**bounds))
        return condition


def order_pb(order_by: str) -> pb.Order:
    """"added_at" (ascending) or "-added_at" (descending) as a protobuf Order; "" for none."""
    return pb.Order(field=order_by.removeprefix("-"), descending=order_by.startswith("-"))


def search_options(k: int, with_captions: bool, filters: Optional[dict], min_score: Optional[float],
                   where: Sequence[Condition] = (), order_by: str = "", page_token: str = "",
                   group_by_video: bool = False) -> pb.SearchOptions:
    options = pb.SearchOptions(k=k, with_captions=with_captions, filters=filters or {},
                               where=[c.to_pb() for c in where], order_by=order_pb(order_by), page_token=page_token,
                               group_by_video=group_by_video)
    if min_score is not None:
        options.min_score = min_score
    return options


REINDEX_ACTIONS = {"start": pb.ReindexRequest.START, "resume": pb.ReindexRequest.RESUME,
                   "rollback": pb.ReindexRequest.ROLLBACK, "drop_old": pb.ReindexRequest.DROP_OLD}


def reindex_request(action: str, to_model: str, to_pretrained: str, triton: str) -> pb.ReindexRequest:
    if action not in REINDEX_ACTIONS:
        raise ValueError(f"reindex action {action!r}: one of {', '.join(REINDEX_ACTIONS)}")
    return pb.ReindexRequest(action=REINDEX_ACTIONS[action], to_model=to_model, to_pretrained=to_pretrained,
                             triton=triton)


def list_request(filters: Optional[dict], where: Sequence[Condition], order_by: str, page_size: int,
                 page_token: str, include_embeddings: bool) -> pb.ListRequest:
    return pb.ListRequest(filters=filters or {}, where=[c.to_pb() for c in where], order_by=order_pb(order_by),
                          page_size=page_size, page_token=page_token, include_embeddings=include_embeddings)


def image_ref(image: Optional[ImageInput], id: str) -> pb.ImageRef:
    if (image is None) == (not id):
        raise ValueError("give either an image or the id of an indexed one")
    return pb.ImageRef(image=read_image(image)) if image is not None else pb.ImageRef(id=id)


MODES = {"vector": pb.SearchTextRequest.VECTOR, "keyword": pb.SearchTextRequest.KEYWORD,
         "hybrid": pb.SearchTextRequest.HYBRID}


def search_text_request(text: str, options: pb.SearchOptions, mode: str,
                        keyword_weight: Optional[float]) -> pb.SearchTextRequest:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return pb.SearchTextRequest(text=text, options=options, mode=MODES[mode], keyword_weight=keyword_weight)


def search_image_request(image: Optional[ImageInput], id: str, options: pb.SearchOptions) -> pb.SearchImageRequest:
    if (image is None) == (not id):
        raise ValueError("give either an image or the id of an indexed one")
    if image is not None:
        return pb.SearchImageRequest(image=read_image(image), options=options)
    return pb.SearchImageRequest(id=id, options=options)


def caption_request(image: Optional[ImageInput], video: Optional[ImageInput], id: str, frames: int,
                    sampling: Optional[Sampling], overrides: dict) -> pb.CaptionRequest:
    if sum(x is not None and x != "" for x in (image, video, id)) != 1:
        raise ValueError("give exactly one of image, video or id")
    settings = Sampling(**{**(vars(sampling) if sampling else {}), **overrides})
    request = pb.CaptionRequest(frames=frames, sampling=settings.to_pb())
    if image is not None:
        request.image = read_image(image)
    elif video is not None:
        request.video = read_image(video)
    else:
        request.id = id
    return request
