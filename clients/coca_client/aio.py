"""The asyncio client: the same calls as `Client`, awaitable.

    from clients.coca_client import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        async for result in client.add([AddItem(image=data, metadata={"album": "x"})]):
            ...
        hits = await asyncio.gather(*(client.search_text(q, k=5) for q in queries))
"""
from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Iterable, Optional, Sequence, Union

import grpc

from search_service.pb import search_pb2 as pb

from . import types as t
from ._common import UNSET as _UNSET, AddStream, ClientBase, HealthWait
from .errors import NotFound, Unavailable, from_rpc_error

CORE_WRITE_ERROR = "Internal error from Core"


class AsyncClient(ClientBase):
    """asyncio flavour of `Client` (same arguments). Create it inside the event loop that uses it."""

    grpc_module = grpc.aio

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r}, tls={self.connection.tls})"

    async def _unary(self, method: str, request, timeout=_UNSET):
        call, attempts = getattr(self._stub, method), self._attempts(method, timeout)
        while True:
            try:
                return await call(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.wait_after(exc))

    async def wait_ready(self, timeout: float = 60.0, service: str = "coca.search.v1.SearchService") -> None:
        wait = HealthWait(self, service, timeout)
        while True:
            try:
                if wait.serving(await wait.check(wait.request, timeout=wait.check_timeout(), metadata=self._metadata)):
                    return
                await asyncio.sleep(wait.pause_after())
            except grpc.RpcError as exc:
                await asyncio.sleep(wait.pause_after(exc))

    # ------------------------------------------------------------ indexing
    async def add(self, items: Iterable[Union[t.AddItem, bytes, str, os.PathLike]], *,
                  timeout: Optional[float] = None) -> AsyncIterator[t.AddResult]:
        """As Client.add: results in order; a sequence of items resumes after UNAVAILABLE."""
        stream = AddStream(items, self.retry, timeout)
        while True:
            call = self._stub.AddImages(stream.requests(), timeout=stream.deadline.remaining(), metadata=self._metadata)
            try:
                async for response in call:
                    yield stream.result(response)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, "AddImages", self.target, stream.attempt)
                if error.code == grpc.StatusCode.INTERNAL and error.details == CORE_WRITE_ERROR:
                    # grpc.aio reports a request written while the server was ending the stream (say, with
                    # UNAVAILABLE) as this client-side INTERNAL, and the server's status is lost: a broken stream.
                    error = Unavailable(grpc.StatusCode.UNAVAILABLE, f"the stream broke while sending ({error.details})",
                                        "AddImages", self.target, stream.attempt)
                wait = stream.wait_before_retry(error)
                if wait is None:
                    raise error from None
                await asyncio.sleep(wait)
            finally:
                call.cancel()  # a no-op when it finished; stops the stream when the caller stopped early

    async def add_videos(self, videos: Iterable[Union[bytes, str, os.PathLike]],
                         metadata: Optional[dict[str, str]] = None, *, server_paths: bool = False,
                         options: Optional[pb.VideoOptions] = None,
                         timeout: Optional[float] = None) -> AsyncIterator[t.VideoResult]:
        """As Client.add_videos: one VideoResult per video, in order, once committed; not retried."""
        requests = t.video_requests(videos, metadata, server_paths, options)
        call = self._stub.AddVideos(requests, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield t.VideoResult.from_pb(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "AddVideos", self.target) from None
        finally:
            call.cancel()

    async def read_video(self, id: str, offset: int = 0, length: int = 4 << 20, *, timeout=_UNSET) -> t.VideoSlice:
        """As Client.read_video."""
        request = pb.ReadVideoRequest(id=id, offset=offset, length=length)
        return t.VideoSlice.from_pb(await self._unary("ReadVideo", request, timeout))

    async def find_content(self, hashes: Sequence[str], *, timeout=_UNSET) -> list[str]:
        """As Client.find_content."""
        return [id for request in t.find_content_requests(list(hashes))
                for id in (await self._unary("FindContent", request, timeout)).ids]

    # ------------------------------------------------------------ search
    async def search_text(self, text: str, k: int = 10, *, with_captions: bool = False,
                          filters: Optional[dict] = None, min_score: Optional[float] = None,
                          where: Sequence[t.Condition] = (), order_by: str = "", page_token: str = "",
                          mode: str = "vector", keyword_weight: Optional[float] = None,
                          timeout=_UNSET) -> t.SearchResult:
        options = t.search_options(k, with_captions, filters, min_score, where, order_by, page_token)
        request = t.search_text_request(text, options, mode, keyword_weight)
        return t.SearchResult.from_pb(await self._unary("SearchText", request, timeout))

    async def search_image(self, image: Optional[t.ImageInput] = None, k: int = 10, *, id: str = "",
                           with_captions: bool = False, filters: Optional[dict] = None,
                           min_score: Optional[float] = None, where: Sequence[t.Condition] = (), order_by: str = "",
                           page_token: str = "", timeout=_UNSET) -> t.SearchResult:
        options = t.search_options(k, with_captions, filters, min_score, where, order_by, page_token)
        return t.SearchResult.from_pb(await self._unary("SearchImage", t.search_image_request(image, id, options),
                                                        timeout))

    # ------------------------------------------------------------ model calls
    async def caption(self, image: Optional[t.ImageInput] = None, *, video: Optional[t.ImageInput] = None,
                      id: str = "", frames: int = 0, sampling: Optional[t.Sampling] = None, timeout=_UNSET,
                      **settings) -> t.Caption:
        request = t.caption_request(image, video, id, frames, sampling, settings)
        return t.Caption.from_pb(await self._unary("Caption", request, timeout))

    async def caption_stream(self, image: Optional[t.ImageInput] = None, *, video: Optional[t.ImageInput] = None,
                             id: str = "", frames: int = 0, sampling: Optional[t.Sampling] = None, timeout=_UNSET,
                             **settings) -> AsyncIterator[t.CaptionChunk]:
        """As Client.caption_stream: CaptionChunks as the text grows; closing the iterator cancels the call;
        retried until its first chunk."""
        request = t.caption_request(image, video, id, frames, sampling, settings)
        attempts = self._attempts("CaptionStream", timeout)
        while True:
            call, chunks = self._stub.CaptionStream(request, timeout=attempts.timeout(), metadata=self._metadata), 0
            try:
                async for chunk in call:
                    chunks += 1
                    yield t.CaptionChunk.from_pb(chunk)
                return
            except grpc.RpcError as exc:
                if chunks:
                    raise from_rpc_error(exc, "CaptionStream", self.target) from None
                wait = attempts.wait_after(exc)  # raises the typed error when it is not retried
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def classify(self, labels: list[str], image: Optional[t.ImageInput] = None, *, id: str = "",
                       template: str = "", timeout=_UNSET) -> list[t.LabelScore]:
        request = pb.ClassifyRequest(image=t.image_ref(image, id), labels=labels, template=template)
        response = await self._unary("Classify", request, timeout)
        return [t.LabelScore(l.label, l.probability, l.similarity) for l in response.labels]

    async def rank(self, texts: list[str], image: Optional[t.ImageInput] = None, *, id: str = "",
                   timeout=_UNSET) -> list[t.TextScore]:
        response = await self._unary("Rank", pb.RankRequest(image=t.image_ref(image, id), texts=texts), timeout)
        return [t.TextScore(s.text, s.distance) for s in response.texts]

    # ------------------------------------------------------------ items
    async def get(self, id: str, *, include_image: bool = False, include_embedding: bool = False,
                  timeout=_UNSET) -> t.Item:
        request = pb.GetRequest(id=id, include_image=include_image, include_embedding=include_embedding)
        return t.Item.from_pb(await self._unary("Get", request, timeout), include_image, include_embedding)

    async def delete(self, id: str, *, timeout=_UNSET) -> str:
        try:
            return (await self._unary("Delete", pb.DeleteRequest(id=id), timeout)).id
        except NotFound as exc:
            if exc.attempts > 1:
                return id
            raise

    async def list(self, *, filters: Optional[dict] = None, where: Sequence[t.Condition] = (), order_by: str = "",
                   page_size: int = 100, page_token: str = "", include_embeddings: bool = False,
                   timeout=_UNSET) -> t.ListPage:
        request = t.list_request(filters, where, order_by, page_size, page_token, include_embeddings)
        return t.ListPage.from_pb(await self._unary("List", request, timeout), include_embeddings)

    async def find_duplicates(self, threshold: float = 0.95, *, page_size: int = 50, page_token: str = "",
                        neighbors: int = 10, timeout=_UNSET) -> t.DuplicatePage:
        """Groups of near-identical items (cosine similarity >= threshold), largest first, a page at a time."""
        request = pb.FindDuplicatesRequest(threshold=threshold, page_size=page_size, page_token=page_token,
                                           neighbors=neighbors)
        return t.DuplicatePage.from_pb(await self._unary("FindDuplicates", request, timeout))

    async def stats(self, *, timeout=_UNSET) -> t.Stats:
        return t.Stats.from_pb(await self._unary("Stats", pb.StatsRequest(), timeout))

    # ------------------------------------------------------------ operations
    async def backup(self, out: str, *, timeout: Optional[float] = None) -> AsyncIterator[t.BackupProgress]:
        """As Client.backup: progress, the last one carrying the summary; not retried; closing the iterator
        does not stop the backup."""
        call = self._stub.Backup(pb.BackupRequest(out=str(out)), timeout=timeout, metadata=self._metadata)
        async for progress in self._results(call, "Backup", t.BackupProgress.from_pb):
            yield progress

    async def reindex(self, action: str = "start", *, to_model: str = "", to_pretrained: str = "", triton: str = "",
                      timeout: Optional[float] = None) -> AsyncIterator[t.ReindexProgress]:
        """As Client.reindex: "start", "resume", "rollback" or "drop_old"; progress, the last with phase "done"."""
        request = t.reindex_request(action, to_model, to_pretrained, triton)
        call = self._stub.Reindex(request, timeout=timeout, metadata=self._metadata)
        async for progress in self._results(call, "Reindex", t.ReindexProgress.from_pb):
            yield progress

    async def _results(self, call, method: str, convert) -> AsyncIterator:
        """A response stream's messages converted; its RpcError as this client's error; cancelled when left."""
        try:
            async for response in call:
                yield convert(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method, self.target) from None
        finally:
            call.cancel()
