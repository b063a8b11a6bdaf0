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

import contextlib
import os
import sys
from typing import Iterator

from serving.errors import TritonServerError
from serving.launcher import TritonServer, pick_free_ports
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
    """`running_triton` on ports chosen up front, so a test can kill the server and start it again
    at the same address."""
    http, grpc_port, metrics = pick_free_ports(3)
    with running_triton(model_repository, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                        **server_kwargs) as (_, _, server):
        yield server


@contextlib.contextmanager
def restartable_tritons(model_repository: str | os.PathLike, count: int = 2, timeout: float = 300.0,
                        **server_kwargs) -> Iterator[list[TritonServer]]:
    """`count` tritonservers on one repository (a pool of endpoints), each on ports chosen up front so
    that a test can kill one and start it again at the same address.

    Started one after the other from this thread: a server dies with the thread that started it
    (kill_on_parent_exit), so never start one from a worker thread that ends before it should."""
    server_kwargs.setdefault("kill_on_parent_exit", True)
    ports = pick_free_ports(3 * count)
    servers = [TritonServer(model_repository, http_port=ports[3 * i], grpc_port=ports[3 * i + 1],
                            metrics_port=ports[3 * i + 2], **server_kwargs) for i in range(count)]
    try:
        for server in servers:
            server.start(timeout)
        yield servers
    except BaseException:
        for server in servers:
            print(f"--- tritonserver log tail ({server!r}) ---\n{server.log_tail(60)}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop()
