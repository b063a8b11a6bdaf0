"""A child process that runs the search service and says where, in one line: the service alone
(search_service.testing.ServiceProcess) or behind `coca serve` (clients.demo.ServeProcess).
Supervised by serving.supervisor (own session, SIGTERM then SIGKILL, dies with its parent)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

from serving.supervisor import Supervisor

READY_LINE = "search service ready on {host}:{port}"  # server.run prints it (and more) once it serves
METRICS_NOTE = ", metrics {url}"  # in the ready line's parentheses when --metrics-port is given
READY = re.compile(READY_LINE.format(host=r"(\S+)", port=r"(\d+)")
                   + r"(?:.*?" + METRICS_NOTE.format(url=r"(http://[^\s),]+/metrics)") + ")?")
ROOT = Path(__file__).resolve().parents[1]


class ServiceChild:
    """`command`, ready once it prints READY_LINE. log_file: its output goes there (see Supervisor)."""

    def __init__(self, command: Sequence[str], *, name: str, env: Optional[dict] = None,
                 log_file: Optional[os.PathLike] = None):
        self.command, self.name, self.env, self.log_file = list(command), name, env, log_file
        self.process: Optional[Supervisor] = None

    @property
    def proc(self):
        """The subprocess.Popen (also once it has exited)."""
        return self.process.proc if self.process else None

    @property
    def address(self) -> Optional[str]:
        """HOST:PORT it serves on, once ready."""
        match = self.process.ready_match if self.process else None
        return f"{match.group(1)}:{match.group(2)}" if match else None

    @property
    def metrics_url(self) -> Optional[str]:
        """Its Prometheus endpoint (http://HOST:PORT/metrics), once ready, if it serves one."""
        match = self.process.ready_match if self.process else None
        return match.group(3) if match else None

    def output(self, lines: Optional[int] = None) -> str:
        """The last lines it wrote."""
        return self.process.tail(lines) if self.process else ""

    def start(self, timeout: float = 300.0):
        """Start it and wait for the ready line; ProcessError (with its output) if it exits or times out first."""
        self.process = Supervisor(self.command, name=self.name, cwd=ROOT, env=self.env, log_file=self.log_file,
                                  ready=READY).start()
        try:
            self.process.wait_ready(timeout)
        except RuntimeError:
            self.process.kill()
            raise
        return self

    def stop(self, grace: float = 30.0) -> Optional[int]:
        """SIGTERM (a graceful stop: the index is snapshotted), SIGKILL to its group after `grace` seconds."""
        return self.process.stop(grace) if self.process else None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
