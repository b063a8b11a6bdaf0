"""A small synchronous client for the search service (coca.search.v1).

    with SearchClient("127.0.0.1:50051") as client:
        for path, result in client.add_files(["a.jpg", "b.png"]):
            print(path, result.outcome, result.id)
        for hit in client.search_text("a cat", k=5, with_captions=True).hits:
            print(hit.score, hit.id, hit.caption)

Errors are grpc.RpcError with the server's status code and message.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import grpc

from search_service.pb import search_pb2 as pb
from search_service.pb.search_pb2_grpc import SearchServiceStub

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_MESSAGE_BYTES = 64 << 20


class SearchClient:
    def __init__(self, address: str = "127.0.0.1:50051", token: Optional[str] = None,
                 tls_ca: Optional[str | os.PathLike] = None, timeout: Optional[float] = 300.0):
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = SearchServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float] = None):
        return method(request, timeout=timeout or self.timeout, metadata=self.metadata)

    # ------------------------------------------------------------ indexing
    def add_images(self, requests: Iterable[pb.AddImageRequest], timeout: Optional[float] = None) -> Iterator[pb.AddImageResult]:
        """Stream requests; one result per request, in order, each sent after its item is committed."""
        return self.stub.AddImages(iter(requests), timeout=timeout, metadata=self.metadata)

    def add_files(self, paths: list[str | os.PathLike], metadata: Optional[dict[str, str]] = None,
                  server_paths: bool = False) -> Iterator[tuple[str, pb.AddImageResult]]:
        """Index local files (sent as bytes, or as server-side paths), yielding (path, result)."""
        paths = [str(p) for p in paths]

        def requests():
            for path in paths:
                if server_paths:
                    yield pb.AddImageRequest(path=os.path.abspath(path), metadata=metadata or {})
                else:
                    yield pb.AddImageRequest(image=Path(path).read_bytes(), uri=os.path.abspath(path),
                                             metadata=metadata or {})

        for result in self.add_images(requests()):
            yield paths[result.index], result

    # ------------------------------------------------------------ search
    def search_text(self, text: str, k: int = 10, with_captions: bool = False, filters: Optional[dict] = None,
                    min_score: Optional[float] = None, timeout: Optional[float] = None) -> pb.SearchResponse:
        return self._call(self.stub.SearchText, pb.SearchTextRequest(
            text=text, options=_options(k, with_captions, filters, min_score)), timeout)

    def search_image(self, image: Optional[bytes] = None, id: str = "", k: int = 10, with_captions: bool = False,
                     filters: Optional[dict] = None, min_score: Optional[float] = None,
                     timeout: Optional[float] = None) -> pb.SearchResponse:
        request = pb.SearchImageRequest(options=_options(k, with_captions, filters, min_score))
        if image is not None:
            request.image = image
        else:
            request.id = id
        return self._call(self.stub.SearchImage, request, timeout)

    # ------------------------------------------------------------ items and models
    def get(self, id: str, include_image: bool = False, include_embedding: bool = False) -> pb.Item:
        return self._call(self.stub.Get, pb.GetRequest(id=id, include_image=include_image,
                                                       include_embedding=include_embedding))

    def delete(self, id: str) -> pb.DeleteResponse:
        return self._call(self.stub.Delete, pb.DeleteRequest(id=id))

    def stats(self) -> pb.StatsResponse:
        return self._call(self.stub.Stats, pb.StatsRequest())

    def caption(self, image: Optional[bytes] = None, video: Optional[bytes] = None, id: str = "", frames: int = 0,
                **sampling) -> pb.CaptionResponse:
        request = pb.CaptionRequest(frames=frames, sampling=pb.SamplingSettings(**sampling))
        if image is not None:
            request.image = image
        elif video is not None:
            request.video = video
        else:
            request.id = id
        return self._call(self.stub.Caption, request)

    def classify(self, labels: list[str], image: Optional[bytes] = None, id: str = "", template: str = "") -> pb.ClassifyResponse:
        return self._call(self.stub.Classify, pb.ClassifyRequest(image=_ref(image, id), labels=labels, template=template))

    def rank(self, texts: list[str], image: Optional[bytes] = None, id: str = "") -> pb.RankResponse:
        return self._call(self.stub.Rank, pb.RankRequest(image=_ref(image, id), texts=texts))


def _options(k, with_captions, filters, min_score) -> pb.SearchOptions:
    options = pb.SearchOptions(k=k, with_captions=with_captions, filters=filters or {})
    if min_score is not None:
        options.min_score = min_score
    return options


def _ref(image: Optional[bytes], id: str) -> pb.ImageRef:
    return pb.ImageRef(image=image) if image is not None else pb.ImageRef(id=id)


def image_files(directory: str | os.PathLike) -> list[Path]:
    """Image files under `directory` (by suffix), sorted, so runs visit them in the same order."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{directory}: not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
