"""Python client of the coca search service (gRPC, package coca.search.v1).

    from clients.coca_client import Client, AsyncClient, AddItem, NotFound, Unavailable

    with Client("127.0.0.1:50051", timeout=30, token=None, tls_ca=None) as client:
        client.wait_ready()
        results = list(client.add_files(["astronaut.jpg", "coffee.jpg"], metadata={"album": "demo"}))
        for hit in client.search_text("a cup of coffee", k=3, with_captions=True):
            print(f"{hit.score:.3f}  {hit.id}  {hit.caption}")
        print(client.caption("coffee.jpg", max_tokens=20).text)

- Results are dataclasses (Hit, SearchResult, AddResult, Caption, LabelScore, TextScore, Item, Stats,
  TritonEndpoint).
- Each call takes `timeout=` (seconds; the client's default otherwise), one deadline covering its retries.
- UNAVAILABLE (service down, or Triton behind it down) is retried with exponential backoff and jitter
  (RetryPolicy); no other status is: the answer would not change.
- Failures raise SearchError subclasses named after the status (InvalidArgument, NotFound, Unavailable, ...)
  carrying `code`, `details` (the server's message), `method` and `target`.
"""
from ._common import NO_RETRY, RetryPolicy
from .aio import AsyncClient
from .client import DEFAULT_TIMEOUT, Client
from .errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
                     NotFound, PermissionDenied, ResourceExhausted, SearchError, Unauthenticated, Unavailable)
from .types import (AddItem, AddResult, BackupProgress, BackupSummary, ReindexProgress, Caption, CaptionChunk, Condition,
                    DuplicateGroup, DuplicatePage, Hit, Item, ItemError, LabelScore, ListPage, Outcome, Sampling,
                    Scene, SearchResult, Stats, TextScore, TritonEndpoint, Video, VideoResult, VideoSlice, video_options)

__all__ = [
    "Client", "AsyncClient", "RetryPolicy", "NO_RETRY", "DEFAULT_TIMEOUT",
    "AddItem", "AddResult", "BackupProgress", "BackupSummary", "ReindexProgress", "Caption", "CaptionChunk", "Condition",
    "DuplicateGroup", "DuplicatePage", "Hit", "Item",
    "ItemError", "LabelScore", "ListPage", "Outcome", "Sampling", "Scene", "SearchResult", "Stats", "TextScore",
    "TritonEndpoint", "Video", "VideoResult", "VideoSlice", "video_options",
    "SearchError", "AlreadyExists", "Cancelled", "DeadlineExceeded", "FailedPrecondition", "Internal",
    "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable",
]
