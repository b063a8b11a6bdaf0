"""Run the search service as a real process (for tests and benchmarks): start, wait until ready, stop or kill."""
from __future__ import annotations

import collections
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
