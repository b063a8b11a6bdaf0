"""Run the real ``tritonserver`` (CPU, Python backend) on a model repository: start, wait until
ready, stop (finding the install is serving/triton_install.py; the process itself is supervised
by serving/supervisor.py).

The stub runs an embedded, *isolated* Python (``sys.flags.isolated == 1``: PYTHONPATH
and PYTHONHOME are ignored).  It finds its prefix by searching ``PATH`` for ``python3``,
so ``<venv>/bin`` goes first in ``PATH`` and the venv's site-packages (with its ``.pth``
files, e.g. an editable install of this project) are used.  The stub links against
``libpython3.X.so.1.0`` found through the normal loader search, which would be the
distribution's libpython; prepending the interpreter's ``LIBDIR`` to ``LD_LIBRARY_PATH``
makes it load the same libpython as the venv's interpreter.

A model's ``model.py`` imports this project's packages the clean way: the project is
installed into the venv (``pip install -e .``).  Nothing in the model code touches
``sys.path``.  The server runs with its working directory set to an empty private
directory because the stub puts ``''`` (the cwd) on ``sys.path``: starting it from the
repository root would make ``import coca`` work by accident and hide a missing install.

CLI::

    python -m serving.launcher --model-repository DIR [--grpc-port 8001] [--http-port 8000]
                               [--metrics-port 8002] [--log-verbose 1] [-- EXTRA TRITON ARGS]

runs until Ctrl-C / SIGTERM and then stops the server (and its stub processes) cleanly. A port given as 0
is picked free (and picked again if tritonserver cannot bind it); the ready line says the ports it bound.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Iterable, Sequence, TextIO

from .errors import TritonServerError
from .supervisor import ProcessError, Supervisor
from .triton_install import find_triton, prepare_backend_dir, python_env

__all__ = ["TritonServer", "TritonServerError", "main", "pick_free_ports"]

DEFAULT_HOST = "127.0.0.1"


def pick_free_ports(n: int = 3, host: str = DEFAULT_HOST) -> list[int]:
    """Return *n* distinct TCP ports that were free on *host* a moment ago (racy by nature).

    They come from below the kernel's ephemeral range: a port the kernel hands out for ``bind(0)`` is one that
    any outgoing connection may take as its local port before the server binds it (CI saw exactly that). Ports
    handed out before by this process are not handed out again."""
    low = _ephemeral_low()
    ports: list[int] = []
    for port in random.sample(range(max(1024, low - _PICK_SPAN), low), _PICK_SPAN // 4):
        if port not in _HANDED_OUT and _bindable(host, port):
            ports.append(port)
            _HANDED_OUT.add(port)
            if len(ports) == n:
                return ports
    raise OSError(f"no {n} free TCP ports found on {host} below {low}")


_PICK_SPAN = 8000
BIND_ATTEMPTS = 5  # launches on fresh ports when tritonserver could not bind one it was given
_BIND_FAILURE = "already in use"  # tritonserver: "failed to start ... service: Unavailable - Socket '...' already in use"
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


_LIVE_SERVERS: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:  # pragma: no cover - exercised only on abnormal exits
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop(grace=10)


class TritonServer:
    """One ``tritonserver`` process (plus its Python-backend stub processes).

    >>> with TritonServer("tests/triton_models") as server:   # picks free ports
    ...     server.grpc_url, server.http_url                   # ('127.0.0.1:4xxxx', 'http://127.0.0.1:4xxxx')

    The server runs in its own process group; every model instance of the Python backend is a
    child stub process in that group, so ``stop()`` can make sure none is left behind.

    Ports left as ``None`` (or 0) are picked free at ``start()``. tritonserver 2.51 cannot bind port 0 for
    more than one of its three servers (it refuses two equal ports, and 0 equals 0), so a port is picked
    here and bound there: when the server then fails to bind one (another process took it meanwhile),
    ``start()`` tries again with fresh ports, up to BIND_ATTEMPTS times. The ports it got are then in
    ``http_port``/``grpc_port``/``metrics_port``. ``keep_ports=True`` keeps them for later starts, so a
    server that is killed comes back at the same address.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = DEFAULT_HOST,
        log_verbose: int = 0,
        log_file: str | os.PathLike | None = None,
        echo: bool | TextIO = False,
        python_executable: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        exit_timeout_secs: int = 10,
        kill_on_parent_exit: bool = False,
        log_tail_lines: int = 400,
        keep_ports: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self._fixed_ports = tuple(port or None for port in (http_port, grpc_port, metrics_port))
        self.http_port, self.grpc_port, self.metrics_port = self._fixed_ports
        self.keep_ports = keep_ports
        self.log_verbose = int(log_verbose)
        self.log_file = Path(log_file).resolve() if log_file is not None else None
        self._echo = (sys.stdout if echo is True else echo) or None
        self.python = python_env(python_executable)
        self.dist = find_triton(self.python.version)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.exit_timeout_secs = int(exit_timeout_secs)
        self.kill_on_parent_exit = kill_on_parent_exit
        self.log_tail_lines = log_tail_lines
        self._process: Supervisor | None = None
        self._workdir: Path | None = None
        self.returncode: int | None = None

    # ---------------------------------------------------------------- urls / state
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_alive() else None

    @property
    def shm_region_prefix(self) -> str:
        """Name prefix of this server's Python-backend regions in /dev/shm (unique per server)."""
        return f"coca_{os.getpid()}_{self.grpc_port}_"

    @property
    def workdir(self) -> Path | None:
        """Private directory of the running server (backend symlinks, empty cwd); removed on stop()."""
        return self._workdir

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def process_group_members(self) -> list[int]:
        """PIDs of the server and its stubs still alive (empty once stopped)."""
        return self._process.group_members() if self._process else []

    def log_tail(self, n: int = 60) -> str:
        return self._process.tail(n) if self._process else ""

    # ---------------------------------------------------------------- command / env
    def command(self, backend_dir: str | os.PathLike) -> list[str]:
        cmd = [
            str(self.dist.server_bin),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={self.dist.caches_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            # Python-backend shared-memory regions live in /dev/shm under this prefix; a unique
            # prefix keeps two servers on one machine from colliding.
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
        ]
        if self.log_verbose:
            cmd.append(f"--log-verbose={self.log_verbose}")
        cmd.extend(self.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)  # ignored by the isolated stub anyway; keep tritonserver clean
        env["PATH"] = os.pathsep.join([str(self.python.bin_dir), env.get("PATH", "/usr/bin:/bin")])
        ld = [str(self.python.libdir)] if self.python.libdir else []
        ld.append(str(self.dist.libs_dir))  # harmless when run in place; needed for relocated trees
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
        env.update(self.extra_env)
        return env

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 300.0) -> "TritonServer":
        """Start the server and wait until ``/v2/health/ready`` answers 200 (all models loaded)."""
        if self.is_alive():
            raise TritonServerError("server already started")
        auto_ports = any(p is None for p in self._fixed_ports)
        attempts = BIND_ATTEMPTS if auto_ports else 1
        for attempt in range(attempts):
            self._launch()
            try:
                self.wait_ready(timeout)
            except TritonServerError:
                bind_failure = _BIND_FAILURE in self.log_tail(400)
                self.stop(grace=10)
                if auto_ports and bind_failure and attempt + 1 < attempts:
                    continue
                raise
            if self.keep_ports:
                self._fixed_ports = (self.http_port, self.grpc_port, self.metrics_port)
            return self
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        ports = pick_free_ports(3, self.host)
        self.http_port, self.grpc_port, self.metrics_port = (
            fixed if fixed is not None else free for fixed, free in zip(self._fixed_ports, ports)
        )
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self._workdir = Path(tempfile.mkdtemp(prefix="coca-triton-"))
        backend_dir = prepare_backend_dir(self.dist, self._workdir / "backends")
        cwd = self._workdir / "cwd"  # empty: the stub puts the cwd on sys.path
        cwd.mkdir()
        self._process = Supervisor(
            self.command(backend_dir), name="tritonserver", cwd=cwd, env=self.environment(),
            log_file=self.log_file, echo=self._echo, tail_lines=self.log_tail_lines,
            die_with_parent=self.kill_on_parent_exit,
        ).start()
        self.returncode = None
        _LIVE_SERVERS.add(self)

    def _health_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        assert self._process is not None
        try:
            self._process.wait_ready(timeout, probe=self._health_ready)
        except ProcessError as exc:
            raise TritonServerError(f"{exc} (model repository {self.model_repository})") from None

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop the server: SIGTERM to the server (it unloads models, calling each stub's
        ``finalize()``), SIGKILL to the whole process group after *grace* seconds, then
        SIGKILL whatever is left in the group (stray stubs).  Returns the server's exit code."""
        process = self._process
        if process is None:
            return self.returncode
        try:
            self.returncode = process.stop(grace)
            # Regions of a stub that was killed are never unlinked; ours have a unique prefix.
            if not process.group_members():
                for name in _list_dir("/dev/shm"):
                    if name.startswith(self.shm_region_prefix):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join("/dev/shm", name))
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            _LIVE_SERVERS.discard(self)
        return self.returncode

    def ensure_running(self, timeout: float = 300.0) -> "TritonServer":
        """Started again (on its kept ports) if it is down: a test that killed it may have failed before restarting."""
        if not self.is_alive():
            self.stop()
            self.start(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL to the server and its stubs at once (a crash: no shutdown code runs), then what
        stop() cleans up. start() brings it back on the same ports if they were fixed."""
        if self._process is not None:
            self._process.kill()
        self.stop(grace=1)

    def __enter__(self) -> "TritonServer":
        if not self.is_alive():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_alive() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, grpc={self.grpc_url}, http={self.http_url}, {state})"


# --------------------------------------------------------------------------- CLI


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.launcher",
        description="Run the tritonserver from the nvidia-pytriton wheel (CPU, Python backend) until "
        "Ctrl-C/SIGTERM. Arguments after '--' go to tritonserver unchanged.",
    )
    parser.add_argument("--model-repository", required=True, help="Triton model repository directory")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="0: a free one (the ready line says which)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0: a free one (the ready line says which)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0: a free one (the ready line says which)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", default=None, help="also append the server log to this file")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--python", default=None, help="interpreter whose venv the stubs use (default: this one)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def _on_signal(signum, _frame):
        stop_requested.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = TritonServer(
            args.model_repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            host=args.host,
            log_verbose=args.log_verbose,
            log_file=args.log_file,
            echo=sys.stdout,
            python_executable=args.python,
            extra_args=extra,
            kill_on_parent_exit=True,
        )
        try:
            server.start(timeout=args.startup_timeout)
        except TritonServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"[serving.launcher] ready: grpc {server.grpc_url}  http {server.http_url}  "
            f"metrics {server.metrics_url}  (pid {server.pid}; Ctrl-C to stop)",
            flush=True,
        )
        while not stop_requested.is_set() and server.is_alive():
            stop_requested.wait(0.5)
        died = not stop_requested.is_set()
        rc = server.stop()
        if died:
            print(f"[serving.launcher] tritonserver exited on its own with code {rc}", file=sys.stderr)
            return rc or 1
        print(f"[serving.launcher] stopped (tritonserver exit code {rc})", flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
