"""Start and stop the real ``tritonserver`` (CPU, Python backend) for a model repository.

The ``nvidia-pytriton`` wheel ships a complete Triton server tree under
``site-packages/pytriton/tritonserver/`` (``bin/tritonserver``, ``backends/python``,
``caches/local``) and one Python-backend stub per Python version under
``python_backend_stubs/<major.minor>/``.  The Python backend looks for its stub next to
``libtriton_python.so`` (``<backend-dir>/python/triton_python_backend_stub``) and the
wheel does not put it there.  Rather than writing into site-packages at run time, each
server gets a private backend directory (a temporary directory of symlinks to the
wheel's files plus the stub for *our* Python version), removed again on ``stop()``.

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

runs until Ctrl-C / SIGTERM and then stops the server (and its stub processes) cleanly.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, TextIO

__all__ = [
    "PythonEnv",
    "TritonDist",
    "TritonServer",
    "TritonServerError",
    "find_triton",
    "main",
    "pick_free_ports",
    "prepare_backend_dir",
    "python_env",
]

STUB_NAME = "triton_python_backend_stub"
DEFAULT_HOST = "127.0.0.1"


class TritonServerError(RuntimeError):
    """The server could not be found, started, or made ready.  The message carries the log tail."""


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class TritonDist:
    """Where the server tree of the installed ``nvidia-pytriton`` wheel lives."""

    root: Path  # .../site-packages/pytriton/tritonserver
    server_bin: Path
    backends_dir: Path
    caches_dir: Path
    stub: Path  # the stub built for the requested Python version
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs (auditwheel-vendored libraries)


@dataclass(frozen=True)
class PythonEnv:
    """The Python environment the stubs should run in (normally the one running us)."""

    executable: Path  # not resolved: <venv>/bin/python
    bin_dir: Path  # goes first in PATH
    version: tuple[int, int]
    libdir: Path | None  # directory holding libpython3.X.so.1.0 (sysconfig LIBDIR), if shared


def python_env(executable: str | os.PathLike | None = None) -> PythonEnv:
    """Describe the interpreter whose environment the Python-backend stubs must use."""
    if executable is None:
        exe = Path(sys.executable)
        version = (sys.version_info.major, sys.version_info.minor)
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    else:
        exe = Path(executable)
        code = (
            "import json, sys, sysconfig; print(json.dumps([sys.version_info[:2], "
            "sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('INSTSONAME')]))"
        )
        try:
            out = subprocess.run([str(exe), "-I", "-c", code], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise TritonServerError(f"cannot run the Python interpreter {exe}: {exc}") from exc
        (major, minor), libdir, ldlibrary = json.loads(out)
        version = (int(major), int(minor))
    exe = Path(os.path.abspath(exe))  # absolute, but keep the venv's symlink
    if not (exe.parent / "python3").exists():
        warnings.warn(
            f"{exe.parent} has no 'python3': the Python-backend stub finds its environment by "
            "searching PATH for python3 and will fall back to another interpreter's site-packages",
            RuntimeWarning,
            stacklevel=2,
        )
    shared = None
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).exists():
        shared = Path(libdir)
    return PythonEnv(executable=exe, bin_dir=exe.parent, version=version, libdir=shared)


def find_triton(python_version: tuple[int, int] | None = None) -> TritonDist:
    """Locate the ``tritonserver`` tree inside the installed ``nvidia-pytriton`` package.

    Only looks the package up (``importlib.util.find_spec``); ``pytriton`` is not imported.
    """
    if python_version is None:
        python_version = (sys.version_info.major, sys.version_info.minor)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the nvidia-pytriton package is not installed in this environment; it provides the "
            "tritonserver binary (pip install nvidia-pytriton==0.7.0)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    tag = f"{python_version[0]}.{python_version[1]}"
    dist = TritonDist(
        root=root,
        server_bin=root / "bin" / "tritonserver",
        backends_dir=root / "backends",
        caches_dir=root / "caches",
        stub=root / "python_backend_stubs" / tag / STUB_NAME,
        libs_dir=root.parent.parent / "nvidia_pytriton.libs",
    )
    if not os.access(dist.server_bin, os.X_OK):
        raise TritonServerError(f"no executable tritonserver at {dist.server_bin}")
    if not (dist.backends_dir / "python" / "libtriton_python.so").exists():
        raise TritonServerError(f"no Python backend at {dist.backends_dir / 'python'}")
    if not dist.stub.exists():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"no Python-backend stub for Python {tag} at {dist.stub} (the wheel has: {', '.join(have) or 'none'})"
        )
    return dist


def prepare_backend_dir(dist: TritonDist, dest: str | os.PathLike) -> Path:
    """Assemble a backend directory at *dest* out of symlinks into the wheel.

    ``dest/python/`` gets links to every file of the wheel's Python backend and to the stub
    for our Python version; other backends (none in 0.7.0) are linked as whole directories.
    Nothing is written into site-packages.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dist.backends_dir.iterdir():
        if entry.name == "python":
            continue
        link = dest / entry.name
        if not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    py = dest / "python"
    py.mkdir(exist_ok=True)
    for entry in (dist.backends_dir / "python").iterdir():
        if entry.name in ("__pycache__", STUB_NAME):
            continue
        link = py / entry.name
        if not link.exists():
            link.symlink_to(entry)
    stub = py / STUB_NAME
    if not stub.exists():
        stub.symlink_to(dist.stub)
    return dest


# --------------------------------------------------------------------------- ports


def pick_free_ports(n: int = 3, host: str = DEFAULT_HOST) -> list[int]:
    """Return *n* distinct TCP ports that were free on *host* a moment ago (racy by nature)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- process helpers


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid* (Linux /proc)."""
    members = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(d))
    return members


def _list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


_LIVE_SERVERS: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:  # pragma: no cover - exercised only on abnormal exits
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop(grace=10)


# --------------------------------------------------------------------------- server


class TritonServer:
    """One ``tritonserver`` process (plus its Python-backend stub processes).

    >>> with TritonServer("tests/triton_models") as server:   # picks free ports
    ...     server.grpc_url, server.http_url                   # ('127.0.0.1:4xxxx', 'http://127.0.0.1:4xxxx')

    The server runs in its own process group (``start_new_session``); every model instance
    of the Python backend is a child stub process in that group, so ``stop()`` can make
    sure none is left behind.

    Ports left as ``None`` are picked free at ``start()``; if the server then fails to bind
    (another process grabbed the port), ``start()`` retries with new ports.
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
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = int(log_verbose)
        self.log_file = Path(log_file).resolve() if log_file is not None else None
        self._echo = (sys.stdout if echo is True else echo) or None
        self.python = python_env(python_executable)
        self.dist = find_triton(self.python.version)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.exit_timeout_secs = int(exit_timeout_secs)
        self.kill_on_parent_exit = kill_on_parent_exit
        self._tail: collections.deque[str] = collections.deque(maxlen=log_tail_lines)
        self._tail_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._log_fh: TextIO | None = None
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
        return self._proc.pid if self._proc else None

    @property
    def shm_region_prefix(self) -> str:
        """Name prefix of this server's Python-backend regions in /dev/shm (unique per server)."""
        return f"coca_{os.getpid()}_{self.grpc_port}_"

    @property
    def workdir(self) -> Path | None:
        """Private directory of the running server (backend symlinks, empty cwd); removed on stop()."""
        return self._workdir

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def process_group_members(self) -> list[int]:
        """PIDs of the server and its stubs still alive (empty once stopped)."""
        return _group_members(self._proc.pid) if self._proc else []

    def log_tail(self, n: int = 60) -> str:
        with self._tail_lock:
            lines = list(self._tail)[-n:]
        return "".join(lines)

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
    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Start the server and wait until ``/v2/health/ready`` answers 200 (all models loaded)."""
        if self.is_alive():
            raise TritonServerError("server already started")
        auto_ports = any(p is None for p in self._fixed_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            self._launch()
            try:
                self.wait_ready(timeout)
                return self
            except TritonServerError as exc:
                bind_failure = "already in use" in self.log_tail(400) or "Failed to start" in self.log_tail(400)
                self.stop(grace=10)
                if auto_ports and bind_failure and attempt + 1 < attempts:
                    continue
                raise exc
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
        with self._tail_lock:
            self._tail.clear()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_file, "a", encoding="utf-8", errors="replace")
        cmd = self.command(backend_dir)
        self._proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches the stubs too
            preexec_fn=_set_parent_death_signal if self.kill_on_parent_exit else None,
        )
        self.returncode = None
        _LIVE_SERVERS.add(self)
        self._reader = threading.Thread(
            target=self._pump_log, args=(self._proc.stdout,), name=f"tritonserver-log-{self._proc.pid}", daemon=True
        )
        self._reader.start()

    def _pump_log(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self._tail_lock:
                self._tail.append(line)
            fh = self._log_fh
            if fh is not None:
                with contextlib.suppress(ValueError, OSError):
                    fh.write(line)
                    fh.flush()
            if self._echo is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._echo.write(line)
                    self._echo.flush()
        stream.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self._proc is not None
        url = f"{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise TritonServerError(
                    f"tritonserver exited with code {rc} before it was ready "
                    f"(model repository {self.model_repository}). Log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f} s (model repository "
                    f"{self.model_repository}). Log tail:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop the server: SIGTERM to the server (it unloads models, calling each stub's
        ``finalize()``), SIGKILL to the whole process group after *grace* seconds, then
        SIGKILL whatever is left in the group (stray stubs).  Returns the server's exit code."""
        proc = self._proc
        if proc is None:
            return self.returncode
        pgid = proc.pid  # start_new_session: pgid == pid
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait()
            # Stubs notice that their parent is gone and exit on their own; give them a moment.
            deadline = time.monotonic() + 5
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_members(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            # Regions of a stub that was killed are never unlinked; ours have a unique prefix.
            if not _group_members(pgid):
                for name in _list_dir("/dev/shm"):
                    if name.startswith(self.shm_region_prefix):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join("/dev/shm", name))
        finally:
            self.returncode = proc.returncode
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            self._proc = None
            _LIVE_SERVERS.discard(self)
        return self.returncode

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
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", default=None, help="also append the server log to this file")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
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
