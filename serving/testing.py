"""Test helpers: run a real tritonserver for the duration of a test (or a test module).

Typical conftest use::

    import pytest
    from serving.testing import running_triton, triton_unavailable_reason

    @pytest.fixture(scope="module")
    def triton(tmp_path_factory):
        reason = triton_unavailable_reason()
        if reason:
            pytest.skip(reason)
        with running_triton("tests/triton_models") as (grpc_url, http_url, server):
            yield grpc_url, http_url, server
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from typing import Iterator, Optional

from serving.errors import TritonServerError
from serving.launcher import TritonServer
from serving.triton_install import find_triton


def triton_unavailable_reason() -> str | None:
    """Why the bundled tritonserver cannot run here (``None`` when it can)."""
    if not sys.platform.startswith("linux"):
        return "tritonserver from nvidia-pytriton runs on Linux only"
    try:
        find_triton()
    except TritonServerError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def running_triton(
    model_repository: str | os.PathLike,
    *,
    timeout: float = 300.0,
    dump_log_on_error: bool = True,
    **server_kwargs,
) -> Iterator[tuple[str, str, TritonServer]]:
    """Start ``tritonserver`` on free 127.0.0.1 ports, yield ``(grpc_url, http_url, server)``,
    stop it (and every stub process) afterwards.

    ``grpc_url`` is ``host:port`` (what ``tritonclient.grpc[.aio]`` wants), ``http_url`` is
    ``http://host:port``.  Extra keyword arguments go to :class:`serving.launcher.TritonServer`
    (``log_verbose=1``, ``log_file=...``, ``extra_args=[...]``).  If the body raises, the tail of
    the server log is printed to stderr so that pytest shows it with the failure.
    """
    server_kwargs.setdefault("kill_on_parent_exit", True)  # no orphaned servers if pytest dies
    server = TritonServer(model_repository, **server_kwargs)
    server.start(timeout=timeout)
    try:
        yield server.grpc_url, server.http_url, server
    except BaseException:
        if dump_log_on_error:
            print(f"--- tritonserver log tail ({server!r}) ---\n{server.log_tail(120)}", file=sys.stderr)
        raise
    finally:
        server.stop()


@contextlib.contextmanager
def restartable_triton(model_repository: str | os.PathLike, **server_kwargs) -> Iterator[TritonServer]:
    """`running_triton` that keeps the ports of its first start, so a test can kill the server and start it
    again at the same address."""
    with running_triton(model_repository, keep_ports=True, **server_kwargs) as (_, _, server):
        yield server


@contextlib.contextmanager
def restartable_tritons(model_repository: str | os.PathLike, count: int = 2, timeout: float = 300.0,
                        **server_kwargs) -> Iterator[list[TritonServer]]:
    """`count` tritonservers on one repository (a pool of endpoints), each keeping the ports of its first start
    so that a test can kill one and start it again at the same address.

    Started one after the other from this thread: a server dies with the thread that started it
    (kill_on_parent_exit), so never start one from a worker thread that ends before it should."""
    server_kwargs.setdefault("kill_on_parent_exit", True)
    servers = [TritonServer(model_repository, keep_ports=True, **server_kwargs) for _ in range(count)]
    try:
        for server in servers:
            server.start(timeout)
        yield servers
    except BaseException:
        for server in servers:
            print(f"--- tritonserver log tail ({server!r}) ---\n{server.log_tail(60)}", file=sys.stderr)
        raise
    finally:
        stop_all(servers)


def stop_all(servers: list[TritonServer]) -> None:
    """Stop the servers at once: each may wait out its exit timeout for requests a test left in flight (10 s),
    and one after the other that was 40 s of a module's teardown with four."""
    threads = [threading.Thread(target=server.stop, name=f"stop {server.grpc_url}") for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


RUN_TIMEOUT_S = 300.0  # run_bounded's default: well inside pytest-timeout's 600 s
CANCEL_WAIT_S = 5.0  # how long run_bounded waits for tasks to end once cancelled


def run_bounded(coroutine, timeout: float = RUN_TIMEOUT_S):
    """asyncio.run, bounded: a coroutine still running after `timeout`, or a task that does not end within
    CANCEL_WAIT_S of its cancel (asyncio.run would wait for it forever), fails with AssertionError naming
    every such task's stack. (A pool test hung `make test` for 13 min once, idle in the event loop.)"""
    loop = asyncio.new_event_loop()
    main = loop.create_task(coroutine)
    try:
        loop.run_until_complete(asyncio.wait({main}, timeout=timeout))
        if not main.done():
            stacks = _task_stacks(loop)
            _cancel_all(loop)
            raise AssertionError(f"still running after {timeout:g} s; its tasks then:\n{stacks}")
        return main.result()
    finally:
        left = _cancel_all(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        if left:
            raise AssertionError(f"tasks that did not end within {CANCEL_WAIT_S:g} s of their cancel:\n{left}")


def _cancel_all(loop: asyncio.AbstractEventLoop) -> str:
    """Cancel every task of `loop` and wait CANCEL_WAIT_S at most: the stacks of those still running."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return ""
    loop.run_until_complete(asyncio.wait(tasks, timeout=CANCEL_WAIT_S))
    return _task_stacks(loop)


def _task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    import io

    out = io.StringIO()
    for task in asyncio.all_tasks(loop):
        if not task.done():
            task.print_stack(file=out)
    return out.getvalue()


class TcpRelay:
    """A TCP relay from a 127.0.0.1 port the kernel picks (bound here, kept by every open()) to `target`
    ("host:port"), run on a thread of its own:
    network faults in front of a real server, as a client sees them, without restarting the server.

    - cut(): every connection reset, new ones refused (the server died); open() listens again (it is back)
    - stall() / resume(): bytes held in both directions, then passed on (a server that stops answering)
    - point_to(target): cut, then open onto another server at the same address (a server replaced)
    - delay(seconds): each chunk held that long before it is passed on (a slow network); delay(0) ends it
    """

    def __init__(self, target: str):
        self.target = _address(target)
        self.port = 0  # the first open() binds a free port; later ones bind it again
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"relay to {target}")
        self._thread.start()
        self._server: Optional[asyncio.AbstractServer] = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._flowing = asyncio.Event()  # bound to the relay's loop when first awaited there
        self._flowing.set()
        self._delay_s = 0.0
        self.open()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._reset_all())

    def point_to(self, target: str) -> None:
        self.cut()
        self.target = _address(target)
        self.open()

    def stall(self) -> None:
        self._run(self._set_flowing(False))

    def resume(self) -> None:
        self._run(self._set_flowing(True))

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "TcpRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _reset_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()  # RST, as from a killed server
        self._transports.clear()

    async def _set_flowing(self, flowing: bool) -> None:
        self._flowing.set() if flowing else self._flowing.clear()

    async def _relay(self, client_reader, client_writer) -> None:
        self._transports.add(client_writer.transport)  # a cut while this connects resets it too
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        if client_writer.transport not in self._transports:  # cut meanwhile
            server_writer.transport.abort()
            return
        self._transports.add(server_writer.transport)
        pumps = [asyncio.ensure_future(self._pump(client_reader, server_writer)),
                 asyncio.ensure_future(self._pump(server_reader, client_writer))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # one side closed: close the other
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (client_writer, server_writer):
            self._transports.discard(writer.transport)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()


def _address(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)
