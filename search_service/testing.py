"""Run the search service as a real process (for tests and benchmarks): start, wait until ready, stop or kill."""
from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

READY = re.compile(r"search service ready on (\S+):(\d+)")


class ServiceProcess:
    """`python -m search_service.server ...` in a child process, its output kept for error messages."""

    def __init__(self, data_dir: str | os.PathLike, triton_url: str, *args: str, env: Optional[dict] = None):
        self.command = [sys.executable, "-m", "search_service.server", "--data", str(data_dir),
                        "--triton", triton_url, "--port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.address: Optional[str] = None
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()

    def start(self, timeout: float = 120.0) -> "ServiceProcess":
        self._ready.clear()
        self.proc = subprocess.Popen(self.command, cwd=Path(__file__).resolve().parents[1], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"search service did not start:\n{self.output()}")
        return self

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._lines.append(line)
            match = READY.search(line)
            if match:
                self.address = f"{match.group(1)}:{match.group(2)}"
                self._ready.set()

    def output(self) -> str:
        return "".join(self._lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: the index is snapshotted) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"search service ignored SIGTERM for {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServiceProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class MilvusServerProcess:
    """A real Milvus standalone (PyPI `milvus`, embedded etcd + local storage) in a child process group.

    One per host: its embedded etcd listens on the fixed localhost:2379, so a test session shares one
    and gives each test its own collection. Its listeners bind all interfaces (Milvus's doing): send
    traffic to 127.0.0.1 only. `common.gracefulStopTimeout` is set to 10 s (the default 1800 s makes
    SIGTERM hang); `kill()` is SIGKILL of the whole group, `start()` again reuses the data directory.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int = 19530):
        self.data_dir = Path(data_dir)
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.data_dir / "milvus-server.log"

    def start(self, timeout: float = 300.0, attempt_s: float = 90.0) -> "MilvusServerProcess":
        """Launch and wait until it answers. A restart right after a kill sometimes never opens the proxy
        port (PLATFORM.md: the port lingers after a SIGKILL): such a launch is killed and tried again."""
        deadline = time.monotonic() + timeout
        while True:
            self._launch()
            give_up = min(deadline, time.monotonic() + attempt_s)
            while time.monotonic() < give_up and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(1.0)
            self.kill()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Milvus did not start on {self.uri}:\n{self.log_tail()}")
            time.sleep(5.0)

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("milvus-server")), "--data", str(self.data_dir),
                   "--proxy-port", str(self.port), "--extra-config", "common.gracefulStopTimeout=10"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

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

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the group (graceful), SIGKILL if it is still there after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL of the whole group: no shutdown code runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the milvus binary, if the wrapper left it

    def __enter__(self) -> "MilvusServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
