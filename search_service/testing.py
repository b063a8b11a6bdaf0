"""The service's test kit: run it as a real process (start, wait until ready, stop or kill), and call
its RPCs at the protobuf level (WireClient)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import grpc
import numpy as np

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


# ---------------------------------------------------------------- search latency under load (tests, bench/)
def search_latencies(client, stop: threading.Event, limit: int, text: str = "a photo") -> list[float]:
    """Seconds of SearchText calls back to back (k 10) until `stop` is set or `limit` calls are done; `client`:
    a WireClient or a coca_client.Client."""
    out = []
    while not stop.is_set() and len(out) < limit:
        started = time.perf_counter()
        client.search_text(text, k=10)
        out.append(time.perf_counter() - started)
    return out


def timed(work):
    """(work()'s value, its seconds)."""
    started = time.perf_counter()
    return work(), time.perf_counter() - started


def while_searching(client, work, stop: Optional[threading.Event] = None):
    """(work()'s value, its seconds) and the latencies of searches made back to back meanwhile (the same search
    load on each path compared), or until `stop` is set."""
    stop, latencies = stop or threading.Event(), []
    searcher = threading.Thread(target=lambda: latencies.extend(search_latencies(client, stop, 10 ** 9)))
    searcher.start()
    try:
        return timed(work), latencies
    finally:
        stop.set()
        searcher.join()


def p99_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, 99)) if latencies else float("nan")


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
    def add_videos(self, requests: Iterable[pb.AddVideoRequest], timeout: Optional[float] = None) -> Iterator[pb.AddVideoResult]:
        return self._call(self.stub.AddVideos, iter(requests), timeout)

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
    """A real Milvus standalone (PyPI `milvus` 2.3.5: embedded etcd + local storage), supervised, that runs
    beside any other Milvus on the host (a user's own on 19530/2379, another test session's).

    The wrapper's CLI cannot do that: its embedded etcd listens on the fixed localhost:2379/2380 whatever the
    config says, so a second server crashes. The child (`python -m search_service.testing milvus ...`) writes
    the wrapper's config itself, points `etcd.config.path` at an embedEtcd.yaml with ports of its own, says
    which ports it took in DATA/ports.json and then execs the milvus binary (the same process: the
    supervisor's signals reach Milvus). The wrapper bind-probes the proxy and internal ports from its
    defaults upwards (an instance beside another gets the next free ones); etcd's two ports and the metrics
    port are picked below the kernel's ephemeral range (serving.launcher.pick_free_ports). A restart keeps
    the ports of the first start, so clients reconnect to the same `uri`. A launch that does not answer in
    time (a port taken between the probe and Milvus binding it) is killed and tried again.

    Its listeners bind all interfaces (Milvus's doing): send traffic to 127.0.0.1 only.
    `common.gracefulStopTimeout` is 10 s (the default 1800 s makes a stop hang); `kill()` is SIGKILL of the
    whole group; `start()` again reuses the data directory.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int = 0):
        self.data_dir = Path(data_dir).resolve()
        self.ports: dict[str, int] = {"proxy_port": port} if port else {}  # fixed once the first start chose
        self.process: Optional[Supervisor] = None

    @property
    def port(self) -> int:
        """The proxy port (what clients connect to); 0 until the first start has chosen it."""
        return self.ports.get("proxy_port", 0)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ports_file(self) -> Path:
        return self.data_dir / "ports.json"

    def start(self, timeout: float = 300.0, attempt_s: float = 90.0) -> "MilvusServerProcess":
        """Launch and wait until it answers. A restart right after a kill sometimes never opens the proxy
        port (PLATFORM.md: the port lingers after a SIGKILL): such a launch is killed and tried again."""
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        while True:
            self.ports_file.unlink(missing_ok=True)
            self.process = Supervisor(
                [sys.executable, "-m", "search_service.testing", "milvus", str(self.data_dir), json.dumps(self.ports)],
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

        if not self.ports_file.is_file():
            return False
        self.ports = json.loads(self.ports_file.read_text())  # this launch's: kept for the next
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
        if self.process is not None:
            self.process.stop(grace=30.0)

    def kill(self) -> None:
        """SIGKILL of the whole group: no shutdown code runs (a crash)."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self) -> "MilvusServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# common.gracefulStopTimeout: the default 1800 s makes a stop hang. proxy.timeTickInterval: a read at Strong (and at
# Session after a write) waits for the next time tick; at the default 200 ms that was ~0.2 s a read, 2/3 of a store
# model step; at 50 ms ~0.055 s, for ~9% of a core idle (4% at 200 ms, 15% at 20 ms; measured on the test server).
# Consistency is unchanged: a read still waits for the tick that covers it, only sooner.
MILVUS_EXTRA_CONFIG = {"common.gracefulStopTimeout": 10, "proxy.timeTickInterval": 50}


def _bind_probe(port: int):
    """The wrapper's port probe (MilvusServerConfig.try_bind_port), with SO_REUSEADDR as Milvus's own (Go)
    listeners bind: the wrapper's, without it, refused a port whose old connections sat in TIME_WAIT after a
    SIGKILL, so a restart on the first start's ports failed ("set etcd_port=..., but bind failed") for ~60 s
    and the Milvus-down test waited ~70 s for the restart. A port another process listens on is still refused."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def exec_milvus(data_dir: Path, fixed: dict[str, int]) -> None:
    """The child of MilvusServerProcess: write the config, say the ports, exec Milvus (never returns).
    `fixed`: ports a previous start chose (the wrapper checks those it manages are free; Milvus fails to
    bind the others if they are not, and the parent tries again)."""
    import milvus
    from serving.launcher import pick_free_ports

    config = milvus.MilvusServerConfig(data_dir=str(data_dir))
    config.try_bind_port = _bind_probe
    etcd_port, peer_port, metrics_port = pick_free_ports(3)
    ports = {"etcd_port": etcd_port, "etcd_peer_port": peer_port, "metrics_port": metrics_port, **fixed}
    config.update(**{key: port for key, port in ports.items() if key in config.configurable_items})
    for key, value in MILVUS_EXTRA_CONFIG.items():
        config.set(key, value)
    config.resolve()  # bind-probes the ports it manages, writes configs/milvus.yaml
    ports.update({key: config.get(key) for key in ("proxy_port", "etcd_port")})
    etcd_config = data_dir / "configs" / "embedEtcd.yaml"
    client_url, peer_url = f"http://127.0.0.1:{ports['etcd_port']}", f"http://127.0.0.1:{ports['etcd_peer_port']}"
    etcd_config.write_text(f"name: default\nlisten-client-urls: {client_url}\nadvertise-client-urls: {client_url}\n"
                           f"listen-peer-urls: {peer_url}\ninitial-advertise-peer-urls: {peer_url}\n"
                           f"initial-cluster: default={peer_url}\n")
    milvus_yaml = data_dir / "configs" / "milvus.yaml"
    text = milvus_yaml.read_text()
    endpoint = f"  endpoints: localhost:{ports['etcd_port']}"
    assert text.count(endpoint) == 1, f"the milvus wrapper's config template changed: no {endpoint!r}"
    milvus_yaml.write_text(text.replace(endpoint, f"  endpoints: 127.0.0.1:{ports['etcd_port']}\n"
                                                  f"  config:\n    path: {etcd_config}", 1))
    milvus._initialize_data_files(str(data_dir))  # unpacks the binary on the first start
    binary = data_dir / "bin" / "milvus"
    env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(ports["metrics_port"]),
           "MILVUS_RUN_DIR": str(data_dir / "run"),
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binary.parent), os.environ.get("LD_LIBRARY_PATH")]))}
    (data_dir / "ports.json.tmp").write_text(json.dumps(ports))
    (data_dir / "ports.json.tmp").replace(data_dir / "ports.json")
    os.chdir(data_dir)  # Milvus reads configs/milvus.yaml from its working directory
    os.execve(binary, [str(binary), "run", "standalone"], env)


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


if __name__ == "__main__":
    if sys.argv[1:2] != ["milvus"] or len(sys.argv) != 4:
        sys.exit("usage: python -m search_service.testing milvus DATA_DIR PORTS_JSON  (MilvusServerProcess's child)")
    exec_milvus(Path(sys.argv[2]), json.loads(sys.argv[3]))
