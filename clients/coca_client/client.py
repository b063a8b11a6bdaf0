"""The synchronous client.

    from clients.coca_client import Client

    with Client("127.0.0.1:50051") as client:
        for result in client.add_files(["a.jpg", "b.png"]):
            print(result.index, result.outcome.value, result.id)
        for hit in client.search_text("a cat", k=5, with_captions=True):
            print(f"{hit.score:.3f} {hit.id} {hit.caption}")
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterable, Iterator, Optional, Sequence, Union

import grpc

from search_service.pb import search_pb2 as pb

from . import types as t
from ._common import DEFAULT_TIMEOUT, UNSET as _UNSET, AddStream, ClientBase, HealthWait
from .errors import NotFound, SearchError, from_rpc_error


class Client(ClientBase):
    """A connection to the search service. Thread-safe; close() it (or use `with`).

    target        HOST:PORT of the service
    timeout       default deadline of each call, in seconds (retries included); None = no deadline.
                  Streams (add) have no default deadline.
    retry         RetryPolicy for UNAVAILABLE and shed calls (RESOURCE_EXHAUSTED with retry-after-ms, waited at
                  least that long); NO_RETRY to fail fast
    token         bearer token (default: $COCA_SEARCH_TOKEN)
    tls_ca        CA certificate (PEM file or bytes) that signed the server's certificate; implies TLS
    tls           TLS with the system's roots
    server_name   TLS host name to check when it differs from the target's host
    """


    # ------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r}, tls={self.connection.tls})"

    def _unary(self, method: str, request, timeout=_UNSET):
        """One unary call with retries on UNAVAILABLE (backoff + jitter) inside one deadline."""
        call, attempts = getattr(self._stub, method), self._attempts(method, timeout)
        while True:
            try:
                return call(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                time.sleep(attempts.wait_after(exc))

    # ------------------------------------------------------------ health
    def wait_ready(self, timeout: float = 60.0, service: str = "coca.search.v1.SearchService") -> None:
        """Block until the service reports SERVING (its health follows Triton's); Unavailable if it never does."""
        wait = HealthWait(self, service, timeout)
        while True:
            try:
                if wait.serving(wait.check(wait.request, timeout=wait.check_timeout(), metadata=self._metadata)):
                    return
                time.sleep(wait.pause_after())
            except grpc.RpcError as exc:
                time.sleep(wait.pause_after(exc))

    # ------------------------------------------------------------ indexing
    def add(self, items: Iterable[Union[t.AddItem, bytes, str, os.PathLike]], *,
            timeout: Optional[float] = None) -> Iterator[t.AddResult]:
        """Index images; yields one AddResult per item, in order, each once the item is committed.

        Items that fail (corrupt image, path outside the server's roots) fail alone: their result says
        FAILED with the status and message. When `items` is a sequence (list, tuple), a stream broken by
        UNAVAILABLE resumes after the last acknowledged item (adding is idempotent by content); a generator
        cannot be replayed, so then the error is raised.
        """
        stream = AddStream(items, self.retry, timeout)
        while True:
            try:
                for response in self._stub.AddImages(stream.requests(), timeout=stream.deadline.remaining(),
                                                     metadata=self._metadata):
                    yield stream.result(response)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, "AddImages", self.target, stream.attempt)
                wait = stream.wait_before_retry(error)
                if wait is None:
                    raise error from None
                time.sleep(wait)

    def add_files(self, paths: Sequence[Union[str, os.PathLike]], metadata: Optional[dict[str, str]] = None, *,
                  server_paths: bool = False, near_duplicate_threshold: Optional[float] = None,
                  skip_near_duplicates: bool = False, caption: bool = False,
                  timeout: Optional[float] = None) -> Iterator[t.AddResult]:
        """Index local files (their bytes are sent; the absolute path is stored as uri), or with
        server_paths=True ask the server to read them (they must be under its --root). Files are read
        one at a time as the stream goes. A file that cannot be read here fails alone. The other options
        are AddItem's, for every file."""
        options = dict(near_duplicate_threshold=near_duplicate_threshold, skip_near_duplicates=skip_near_duplicates,
                       caption=caption)
        files = _FileItems(list(paths), metadata or {}, server_paths, options=options)
        for result in self.add(files, timeout=timeout):
            reason = files.read_errors.get(result.index)
            if reason and result.outcome is t.Outcome.FAILED:  # say why here, not what the server saw
                result = dataclasses.replace(result, error=t.ItemError(grpc.StatusCode.INVALID_ARGUMENT, reason))
            yield result

    def add_videos(self, videos: Iterable[Union[bytes, str, os.PathLike]], metadata: Optional[dict[str, str]] = None,
                   *, server_paths: bool = False, options: Optional[pb.VideoOptions] = None,
                   timeout: Optional[float] = None) -> Iterator[t.VideoResult]:
        """Index videos (bytes, or local files read one at a time; with server_paths=True the server reads
        them, under its --root) as scenes; yields one VideoResult per video, in order, once it is committed
        with all its scenes. A video that fails fails alone. Not retried (a long video is costly to redo:
        run again, and the videos already stored come back DUPLICATE without being decoded).
        `options`: types.video_options(every_s=..., caption=True, ...)."""
        requests = t.video_requests(videos, metadata, server_paths, options)
        call = self._stub.AddVideos(requests, timeout=timeout, metadata=self._metadata)
        yield from self._results(call, "AddVideos", t.VideoResult.from_pb)

    def read_video(self, id: str, offset: int = 0, length: int = 4 << 20, *, timeout=_UNSET) -> t.VideoSlice:
        """Bytes of a stored video from `offset` (at most 4 MiB a call); InvalidArgument (code OUT_OF_RANGE)
        for an offset at or past its end, NotFound for an id that is not a video."""
        request = pb.ReadVideoRequest(id=id, offset=offset, length=length)
        return t.VideoSlice.from_pb(self._unary("ReadVideo", request, timeout))

    def find_content(self, hashes: Sequence[str], *, timeout=_UNSET) -> list[str]:
        """The id holding each content sha256 (hex), "" where that content is not indexed; in order."""
        return [id for request in t.find_content_requests(list(hashes))
                for id in self._unary("FindContent", request, timeout).ids]

    # ------------------------------------------------------------ search
    def search_text(self, text: str, k: int = 10, *, with_captions: bool = False, filters: Optional[dict] = None,
                    min_score: Optional[float] = None, where: Sequence[t.Condition] = (), order_by: str = "",
                    page_token: str = "", mode: str = "vector", keyword_weight: Optional[float] = None,
                    group_by_video: bool = False, timeout=_UNSET) -> t.SearchResult:
        """Items like the text. `where`: more conditions (AND); `order_by`: a date/number field ("-field":
        descending) instead of by score; `page_token`: the previous result's next_page_token (same query);
        `mode`: "vector", "keyword" (caption words, BM25) or "hybrid" (both, fused; `keyword_weight` 0..1);
        `group_by_video`: each video's best scene only."""
        options = t.search_options(k, with_captions, filters, min_score, where, order_by, page_token, group_by_video)
        request = t.search_text_request(text, options, mode, keyword_weight)
        return t.SearchResult.from_pb(self._unary("SearchText", request, timeout))

    def search_image(self, image: Optional[t.ImageInput] = None, k: int = 10, *, id: str = "",
                     with_captions: bool = False, filters: Optional[dict] = None, min_score: Optional[float] = None,
                     where: Sequence[t.Condition] = (), order_by: str = "", page_token: str = "",
                     group_by_video: bool = False, timeout=_UNSET) -> t.SearchResult:
        """Images like `image` (bytes or a local file), or like the indexed item `id` (which finds itself first)."""
        options = t.search_options(k, with_captions, filters, min_score, where, order_by, page_token, group_by_video)
        return t.SearchResult.from_pb(self._unary("SearchImage", t.search_image_request(image, id, options), timeout))

    # ------------------------------------------------------------ model calls
    def caption(self, image: Optional[t.ImageInput] = None, *, video: Optional[t.ImageInput] = None, id: str = "",
                frames: int = 0, sampling: Optional[t.Sampling] = None, timeout=_UNSET, **settings) -> t.Caption:
        """Caption an image, a video (`frames` sampled, default 16) or an indexed item. `settings` are
        Sampling fields (temperature=0.7, top_k=50, num_beams=3, max_tokens=20, seed=1, ...)."""
        request = t.caption_request(image, video, id, frames, sampling, settings)
        return t.Caption.from_pb(self._unary("Caption", request, timeout))

    def caption_stream(self, image: Optional[t.ImageInput] = None, *, video: Optional[t.ImageInput] = None,
                       id: str = "", frames: int = 0, sampling: Optional[t.Sampling] = None, timeout=_UNSET,
                       **settings) -> Iterator[t.CaptionChunk]:
        """caption(), as the text is written: a CaptionChunk each time it grows (`piece`: the new text), the
        last one `done` with the Caption. Stop iterating early (close the iterator) to cancel: the server
        frees its decoder sequence. Retried as a unary call (UNAVAILABLE, or shed) until its first chunk, never
        after (chunks already seen cannot be taken back)."""
        request = t.caption_request(image, video, id, frames, sampling, settings)
        attempts = self._attempts("CaptionStream", timeout)
        while True:
            call, chunks = self._stub.CaptionStream(request, timeout=attempts.timeout(), metadata=self._metadata), 0
            try:
                for chunk in call:
                    chunks += 1
                    yield t.CaptionChunk.from_pb(chunk)
                return
            except grpc.RpcError as exc:
                if chunks:
                    raise from_rpc_error(exc, "CaptionStream", self.target) from None
                wait = attempts.wait_after(exc)  # raises the typed error when it is not retried
            finally:
                call.cancel()  # a no-op when it finished
            time.sleep(wait)

    def classify(self, labels: list[str], image: Optional[t.ImageInput] = None, *, id: str = "", template: str = "",
                 timeout=_UNSET) -> list[t.LabelScore]:
        """Zero-shot classification, most likely label first."""
        request = pb.ClassifyRequest(image=t.image_ref(image, id), labels=labels, template=template)
        response = self._unary("Classify", request, timeout)
        return [t.LabelScore(l.label, l.probability, l.similarity) for l in response.labels]

    def rank(self, texts: list[str], image: Optional[t.ImageInput] = None, *, id: str = "",
             timeout=_UNSET) -> list[t.TextScore]:
        """Texts by cosine distance to the image, closest first."""
        response = self._unary("Rank", pb.RankRequest(image=t.image_ref(image, id), texts=texts), timeout)
        return [t.TextScore(s.text, s.distance) for s in response.texts]

    # ------------------------------------------------------------ items
    def get(self, id: str, *, include_image: bool = False, include_embedding: bool = False,
            timeout=_UNSET) -> t.Item:
        request = pb.GetRequest(id=id, include_image=include_image, include_embedding=include_embedding)
        return t.Item.from_pb(self._unary("Get", request, timeout), include_image, include_embedding)

    def delete(self, id: str, *, timeout=_UNSET) -> str:
        """Delete an item from store and index; returns its id. NotFound if there is none."""
        try:
            return self._unary("Delete", pb.DeleteRequest(id=id), timeout).id
        except NotFound as exc:
            if exc.attempts > 1:  # an earlier attempt went through but its answer was lost
                return id
            raise

    def list(self, *, filters: Optional[dict] = None, where: Sequence[t.Condition] = (), order_by: str = "",
             page_size: int = 100, page_token: str = "", include_embeddings: bool = False,
             timeout=_UNSET) -> t.ListPage:
        """One page of the items passing the conditions, oldest first or in `order_by` ("-added_at": newest first)."""
        request = t.list_request(filters, where, order_by, page_size, page_token, include_embeddings)
        return t.ListPage.from_pb(self._unary("List", request, timeout), include_embeddings)

    def iter_items(self, **query) -> Iterator[t.Item]:
        """Every item passing the conditions (list()'s arguments), a page at a time."""
        token = None
        while token != "":
            page = self.list(**query, page_token=token or "")
            yield from page.items
            token = page.next_page_token

    def find_duplicates(self, threshold: float = 0.95, *, page_size: int = 50, page_token: str = "",
                        neighbors: int = 10, timeout=_UNSET) -> t.DuplicatePage:
        """Groups of near-identical items (cosine similarity >= threshold), largest first, a page at a time."""
        request = pb.FindDuplicatesRequest(threshold=threshold, page_size=page_size, page_token=page_token,
                                           neighbors=neighbors)
        return t.DuplicatePage.from_pb(self._unary("FindDuplicates", request, timeout))

    def stats(self, *, timeout=_UNSET) -> t.Stats:
        return t.Stats.from_pb(self._unary("Stats", pb.StatsRequest(), timeout))


    # ------------------------------------------------------------ operations
    def backup(self, out: str, *, timeout: Optional[float] = None) -> Iterator[t.BackupProgress]:
        """Back the service's store up into `out`, a folder on the service's machine under its --root folders
        (a previous backup there: only new blobs are copied). Yields progress; the last one carries the
        summary. No deadline unless given; not retried; stopping early does not stop the backup."""
        call = self._stub.Backup(pb.BackupRequest(out=str(out)), timeout=timeout, metadata=self._metadata)
        yield from self._results(call, "Backup", t.BackupProgress.from_pb)

    def reindex(self, action: str = "start", *, to_model: str = "", to_pretrained: str = "", triton: str = "",
                timeout: Optional[float] = None) -> Iterator[t.ReindexProgress]:
        """Move the service's store to another model while it serves (README "Reindex to new weights"): action
        "start" (to_model, to_pretrained, triton: the endpoints serving it), "resume", "rollback" (triton:
        overrides the recorded endpoints) or "drop_old". Yields progress; the last one has phase "done". No
        deadline unless given; not retried; stopping early does not stop the reindex (resume listens again)."""
        request = t.reindex_request(action, to_model, to_pretrained, triton)
        call = self._stub.Reindex(request, timeout=timeout, metadata=self._metadata)
        yield from self._results(call, "Reindex", t.ReindexProgress.from_pb)

    def _results(self, call, method: str, convert) -> Iterator:
        """A response stream's messages converted; its RpcError as this client's error; cancelled when left."""
        try:
            for response in call:
                yield convert(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method, self.target) from None
        finally:
            call.cancel()


class _FileItems(Sequence):
    """Files as AddItems, read only when the stream gets to them (so retries can slice without reading)."""

    def __init__(self, paths: list, metadata: dict[str, str], server_paths: bool, offset: int = 0,
                 read_errors: Optional[dict[int, str]] = None, options: Optional[dict] = None):
        self.paths, self.metadata, self.server_paths, self.offset = paths, metadata, server_paths, offset
        self.options = options or {}  # AddItem fields given to every file (near-duplicate check, caption)
        self.read_errors = {} if read_errors is None else read_errors  # index in the whole list -> why

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self.paths))
            if step != 1:
                raise ValueError("only contiguous slices")
            return _FileItems(self.paths[start:stop], self.metadata, self.server_paths, self.offset + start,
                              self.read_errors, self.options)
        path = os.path.abspath(self.paths[i])
        if self.server_paths:
            return t.AddItem(path=path, metadata=self.metadata, **self.options)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.read_errors[self.offset + (i % len(self.paths))] = f"{path}: cannot read: {exc.strerror or exc}"
            data = b""  # sent empty: the server fails this item alone
        return t.AddItem(image=data, uri=path, metadata=self.metadata, **self.options)


__all__ = ["Client", "SearchError", "DEFAULT_TIMEOUT"]
