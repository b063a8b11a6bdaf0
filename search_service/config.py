"""Service configuration and the rule for server-side paths."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from coca.media import VideoLimits
from coca.texts import MAX_TEXT_CHARS
from serving.pool import parse_endpoints
from .admission import Limits
from .caption_retry import RetryPolicy
from .index import IndexSettings
from .collection import MAX_SEARCH_DEPTH
from .milvus import MAX_TOPK, MilvusSettings
from .query import Schema

VECTOR_STORES = ("faiss", "milvus")

DEFAULT_PORT = 50051
MIN_REINDEX_SHARE = 0.001  # a reindex under searches that never pause still moves (a 2-image chunk: ~1 s in 1000)


class PathRefused(Exception):
    """A server-side path that is not under a configured root (or names no file)."""

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


@dataclass
class ServiceConfig:
    data_dir: Path
    triton_url: str = "127.0.0.1:8001"  # one HOST:PORT, or several joined by commas (serving.pool)
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = DEFAULT_PORT  # 0: pick a free port
    allowed_roots: list[Path] = field(default_factory=list)  # empty: no server-side paths at all
    backup_root: Optional[Path] = None  # the Backup RPC writes under it only; None: Backup is refused (off)
    index: IndexSettings = field(default_factory=IndexSettings)
    vector_store: str = "faiss"  # "faiss": SQLite + FAISS in data_dir; "milvus": a Milvus collection + blobs in data_dir
    milvus: MilvusSettings = field(default_factory=MilvusSettings)
    max_message_bytes: int = 64 << 20  # larger gRPC messages are refused with RESOURCE_EXHAUSTED
    max_image_bytes: int = 32 << 20  # one image (bytes or file)
    max_pixels: int = 40_000_000  # decompression-bomb guard (coca.media's default)
    max_k: int = 1000
    max_search_depth: int = MAX_SEARCH_DEPTH  # search pages reach this many hits deep (page tokens)
    max_page_size: int = 1000  # List
    schema: Schema = field(default_factory=Schema)  # declared metadata fields (--field NAME:TYPE)
    max_texts: int = 1000  # labels in Classify, texts in Rank
    max_text_chars: int = MAX_TEXT_CHARS  # one query, label prompt or Rank text (the Triton model's own bound)
    max_request_text_chars: int = 50_000  # all texts of one Classify/Rank: bounds the tokenizer's work per call
    max_uri_chars: int = 4096  # an AddImages uri label (a path's length on Linux)
    caption_workers: int = 8  # hits captioned at once by one search with_captions (each one decoder sequence)
    add_batch: int = 32  # images embedded concurrently and committed together in AddImages
    max_duplicate_scan: int = 100_000  # items one FindDuplicates scan reads (N^2 work: ~10 s at 100k, 512-d)
    intake_bytes: int = 512 << 20  # AddImages items held at once, all streams (backpressure beyond; see IntakeBudget)
    accept_embeddings: bool = False  # AddImages takes callers' precomputed embeddings (trusts its writers)
    snapshot_every: int = 10_000  # changes between index snapshots (and one at shutdown)
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    bearer_token: Optional[str] = None  # clients must send "authorization: Bearer <token>"; several: one per line
    logit_scale: float = 100.0  # Classify's softmax scale: Triton does not serve CoCa's learned one
    triton_timeout_s: float = 60.0  # per model call when the client set no deadline
    text_cache_size: int = 4096  # recent query-text embeddings kept (2 KiB each at 512-d); 0: none
    limits: Limits = field(default_factory=Limits)  # load shedding: bounds on work in flight, rate limit
    metrics_port: Optional[int] = None  # Prometheus /metrics on host:metrics_port (0: a free port); None: off
    caption_retry: RetryPolicy = field(default_factory=RetryPolicy)  # ingest captions that failed, tried again
    video: VideoLimits = field(default_factory=VideoLimits)  # what decoding one AddVideos video may cost
    max_video_bytes: int = 4 << 30  # one video file (bytes sent are also bounded by max_message_bytes)
    reindex_share: float = 0.01  # most of the time a reindex keeps its Triton busy while searches run (1: no throttle)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        self.allowed_roots = [Path(r) for r in self.allowed_roots]
        if self.backup_root is not None:
            self.backup_root = Path(self.backup_root)
            _check_apart(self.backup_root, self.allowed_roots)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key file")
        if self.caption_workers < 1:
            raise ValueError(f"caption workers must be at least 1, got {self.caption_workers}")
        parse_endpoints(self.triton_url)  # ValueError naming a malformed address
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535] (0: a free one), got {self.metrics_port}")
        if not MIN_REINDEX_SHARE <= self.reindex_share <= 1:
            raise ValueError(f"reindex share must be in [{MIN_REINDEX_SHARE}, 1] (1: no throttle), got "
                             f"{self.reindex_share}")
        if self.vector_store not in VECTOR_STORES:
            raise ValueError(f"vector store must be one of {VECTOR_STORES}, got {self.vector_store!r}")
        if self.vector_store == "milvus" and self.max_search_depth + self.max_k + 1 > MAX_TOPK:
            raise ValueError(f"max search depth + max k + 1 must be at most {MAX_TOPK} with Milvus (its largest "
                             f"search limit), got {self.max_search_depth} + {self.max_k} + 1")

    def resolve_path(self, path: str) -> Path:
        return resolve_under_roots(path, self.allowed_roots)

    def resolve_backup_folder(self, path: str) -> Path:
        """Where a backup folder would be: under backup_root (never the --root folders the service reads)."""
        if self.backup_root is None:
            raise BackupsOff(BACKUPS_OFF)
        return resolve_under_roots(path, [self.backup_root], want_file=False)


BACKUPS_OFF = "backups through the service are off: start it with --backup-root DIR (the folder backups go under)"


class BackupsOff(Exception):
    """A Backup call to a service started without --backup-root."""


def _check_apart(backup_root: Path, read_roots: list[Path]) -> None:
    """Backups never land in the folders AddImages reads (nor those inside a backup folder)."""
    backups = Path(os.path.realpath(backup_root))
    for root in read_roots:
        real = Path(os.path.realpath(root))
        if backups == real or backups.is_relative_to(real) or real.is_relative_to(backups):
            raise ValueError(f"--backup-root {backup_root} overlaps --root {root}: backups must not land in the "
                             "folders the service reads images from")


def resolve_under_roots(path: str, roots: list[Path], want_file: bool = True) -> Path:
    """The real file `path` names (want_file=False: the real path, existing or not), if it lies under one
    of `roots`; PathRefused otherwise.

    Relative paths are taken relative to the first root. Any `..` component is
    refused outright, and symlinks are resolved before the check, so a link
    inside a root that points outside it is refused too. Messages show the path as
    given (a link's target, or where a relative path landed, is not the client's business).
    """
    shown = _as_given(path)
    if not roots:
        raise PathRefused(f"{shown}: this server accepts no server-side paths (no allowed roots configured)")
    if not path or "\x00" in path:
        raise PathRefused(f"{shown}: not a valid path")
    given = Path(path)
    if ".." in given.parts:
        raise PathRefused(f"{shown}: '..' is not allowed in server-side paths")
    candidate = given if given.is_absolute() else roots[0] / given
    try:  # a name over the OS limits (ENAMETOOLONG), a loop of links (ELOOP): refused, not an internal error
        real = Path(os.path.realpath(candidate))
        real_roots = [Path(os.path.realpath(r)) for r in roots]
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            raise PathRefused(f"{shown}: outside the allowed roots ({', '.join(str(r) for r in roots)})")
        if want_file and not real.is_file():
            raise PathRefused(f"{shown}: no such file under the allowed roots", not_found=True)
    except OSError as exc:
        raise PathRefused(f"{shown}: not a usable path ({exc.strerror})") from None
    return real


def _as_given(path: str, limit: int = 200) -> str:
    """The path as the client wrote it, for messages: quoted, and cut short (never the resolved one)."""
    return repr(path[:limit]) + ("..." if len(path) > limit else "")
