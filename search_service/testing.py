"""The service's test kit: run it as a real process (start, wait until ready, stop or kill), and call
its RPCs at the protobuf level (WireClient)."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import grpc

from serving.supervisor import ProcessError, Supervisor

from .pb import search_pb2 as pb
from .pb.search_pb2_grpc import SearchServiceStub
from .process import ServiceChild

MAX_MESSAGE_BYTES = 64 << 20  # the server's default limit


class ServiceProcess(ServiceChild):
    """`python -m search_service.server ...` in a child process, its output kept for error messages."""

    def __init__(self, data_dir: str | os.PathLike, triton_url: str, *args: str, env: Optional[dict] = None):
        super().__init__([sys.executable, "-m", "search_service.server", "--data", str(data_dir),
                          "--triton", triton_url, "--port", "0", *args],
                         name="search service", env={**os.environ, **(env or {})})

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: the index is snapshotted) and wait; RuntimeError if it had to be killed."""
        returncode = super().stop(timeout)
        if self.process is not None and self.process.forced:
            raise RuntimeError(f"search service ignored SIGTERM for {timeout} s:\n{self.output()}")
        return returncode or 0


class WireClient:
    """The service's RPCs one to one: protobuf requests in, protobuf answers out, grpc.RpcError with the
    server's status and message, no retries. For tests of the wire contract; applications use
    clients.coca_client (typed results, retries, one deadline per call).

        with WireClient(service.address) as client:
            client.search_text("a cat", k=5).hits
    """

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

    def __enter__(self) -> "WireClient":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: Optional[float] = None):
        return method(request, timeout=timeout or self.timeout, metadata=self.metadata)

    # ------------------------------------------------------------ indexing
    def add_images(self, requests: Iterable[pb.AddImageRequest], timeout: Optional[float] = None) -> Iterator[pb.AddImageResult]:
        """Stream requests; one result per request, in order, each sent after its item is committed."""
        return self.stub.AddImages(iter(requests), timeout=timeout, metadata=self.metadata)

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


class MilvusServerProcess:
    """A real Milvus standalone (PyPI `milvus`, embedded etcd + local storage), supervised.

    One per host: its embedded etcd listens on the fixed localhost:2379, so a test session shares one
    and gives each test its own collection. Its listeners bind all interfaces (Milvus's doing): send
    traffic to 127.0.0.1 only. `common.gracefulStopTimeout` is 10 s (the default 1800 s makes a stop
    hang); `kill()` is SIGKILL of the whole group; `start()` again reuses the data directory.
    """

    LOCK = "/tmp/coca-search-milvus.lock"  # processes that want the host's one Milvus take turns

    def __init__(self, data_dir: str | os.PathLike, port: int = 19530):
        self.data_dir = Path(data_dir)
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.process: Optional[Supervisor] = None
        self._lock = None

    def _take_turn(self) -> None:
        import fcntl

        if self._lock is not None:
            return
        self._lock = open(self.LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process's Milvus to stop ({self.LOCK}) ...", file=sys.stderr, flush=True)
            fcntl.flock(self._lock, fcntl.LOCK_EX)

    def start(self, timeout: float = 300.0, attempt_s: float = 90.0) -> "MilvusServerProcess":
        """Launch and wait until it answers. A restart right after a kill sometimes never opens the proxy
        port (PLATFORM.md: the port lingers after a SIGKILL): such a launch is killed and tried again."""
        self._take_turn()
        deadline = time.monotonic() + timeout
        while True:
            self.process = Supervisor(
                [str(Path(sys.executable).with_name("milvus-server")), "--data", str(self.data_dir), "--proxy-port",
                 str(self.port), "--extra-config", "common.gracefulStopTimeout=10"],
                name="milvus", log_file=self.data_dir / "milvus-server.log").start()
            try:
                self.process.wait_ready(min(attempt_s, max(deadline - time.monotonic(), 1.0)), probe=self._answers,
                                        interval=1.0)
                return self
            except ProcessError:
                self.process.kill()
                if time.monotonic() >= deadline:
                    raise
            time.sleep(5.0)

    def _answers(self) -> bool:
        from pymilvus import MilvusClient

        client = None
        try:
            client = MilvusClient(uri=self.uri, timeout=2.0)
            client.list_collections(timeout=2.0, retry_times=1)
            return True
        except Exception:
            return False
        finally:  # never keep a cached connection whose channel backs off reconnecting
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    def stop(self) -> None:
        """Stop it and let the next process have its turn."""
        if self.process is not None:
            self.process.stop(grace=30.0)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def kill(self) -> None:
        """SIGKILL of the whole group: no shutdown code runs (a crash)."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self) -> "MilvusServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """The first truthy value of `predicate()` within `timeout` seconds (an RpcError counts as not yet: the
    service may be restarting); AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except grpc.RpcError:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
