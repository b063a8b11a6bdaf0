"""Typed results (plain dataclasses, no protobuf in sight) and the inputs that build requests."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union

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

    @classmethod
    def from_pb(cls, hit: pb.Hit) -> "Hit":
        return cls(hit.id, float(hit.score), hit.uri, hit.caption, hit.caption_error, dict(hit.metadata))


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    searched: int  # items in the index

    @classmethod
    def from_pb(cls, response: pb.SearchResponse) -> "SearchResult":
        return cls([Hit.from_pb(h) for h in response.hits], int(response.searched))

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


_OUTCOMES = {pb.AddImageResult.ADDED: Outcome.ADDED, pb.AddImageResult.DUPLICATE: Outcome.DUPLICATE,
             pb.AddImageResult.FAILED: Outcome.FAILED}


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

    @classmethod
    def from_pb(cls, result: pb.AddImageResult, offset: int = 0) -> "AddResult":
        error = None
        if result.HasField("error") and (result.error.code or result.error.message):
            error = ItemError(status_code(result.error.code), result.error.message)
        return cls(int(result.index) + offset, _OUTCOMES.get(result.outcome, Outcome.FAILED), result.id,
                   result.content_sha256, error)

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
    image: Optional[bytes] = None  # only when asked for (include_image=True)
    embedding: Optional[np.ndarray] = None  # only when asked for (include_embedding=True)

    @classmethod
    def from_pb(cls, item: pb.Item, include_image: bool, include_embedding: bool) -> "Item":
        return cls(item.id, item.content_sha256, item.uri, dict(item.metadata), item.caption, item.created_at,
                   item.updated_at, bytes(item.image) if include_image else None,
                   np.asarray(item.embedding, dtype=np.float32) if include_embedding else None)


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

    @classmethod
    def from_pb(cls, s: pb.StatsResponse) -> "Stats":
        values = {f.name: getattr(s, f.name) for f in fields(cls)}
        values["triton_endpoints"] = tuple(TritonEndpoint.from_pb(e) for e in s.triton_endpoints)
        return cls(**values)


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
    embedding: Optional[np.ndarray] = None
    repository_id: str = ""

    def to_pb(self) -> pb.AddImageRequest:
        request = pb.AddImageRequest(id=self.id, metadata=self.metadata, uri=self.uri)
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


def search_options(k: int, with_captions: bool, filters: Optional[dict], min_score: Optional[float]) -> pb.SearchOptions:
    options = pb.SearchOptions(k=k, with_captions=with_captions, filters=filters or {})
    if min_score is not None:
        options.min_score = min_score
    return options


def image_ref(image: Optional[ImageInput], id: str) -> pb.ImageRef:
    if (image is None) == (not id):
        raise ValueError("give either an image or the id of an indexed one")
    return pb.ImageRef(image=read_image(image)) if image is not None else pb.ImageRef(id=id)


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
