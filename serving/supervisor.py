"""One child process, supervised: started in its own session, its output read line by line, ready
when a line matches (or a probe says so), stopped with SIGTERM and then SIGKILL to its whole
process group, and by default killed by the kernel if we die first.

The one home of this job for tritonserver (serving.launcher), the search service in tests and
benchmarks (search_service.testing) and `coca serve` under the demo (clients.demo); it sits in
serving/, the lowest layer all three may import.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO, Union

PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """The process exited, or did not get ready in time. The message carries the tail of its output."""


def die_with_parent() -> None:
    """In the child, between fork and exec: the kernel sends SIGTERM when the forking thread dies."""
    with contextlib.suppress(Exception):  # best effort: Linux only
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch_settings(command: list[str], dies_with_parent: bool) -> tuple[list[str], Optional[Callable[[], None]]]:
    """The command line and preexec_fn of a child that dies with its parent (or not).

    util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command, so no Python runs in the
    child between fork and exec: a preexec_fn does, which aborts the child now and then while other
    threads of this process are inside gRPC (seen: 2 of 200 starts died of SIGABRT in abseil's mutex
    code) and makes subprocess fork instead of vfork. Without setpriv, the preexec_fn it is.
    """
    if not dies_with_parent:
        return command, None
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *command], None
    return command, die_with_parent


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


class Supervisor:
    """One run of `command` (start it again with a new Supervisor).

    log_file  the child writes its output (stdout and stderr) straight into this file, appending, and
              the supervisor follows the file: the child never dies of a broken pipe if we go first.
              None: a pipe.
    echo      also copy each line there (a text stream, e.g. sys.stdout)
    ready     a regex: the first output line that matches it makes the process ready (`ready_match`)
    die_with_parent  PR_SET_PDEATHSIG: note that the kernel signals when the *thread* that started the
              child exits, so start long-lived children from the main thread.
    """

    def __init__(self, command: Sequence[str], *, name: str, cwd: Union[str, os.PathLike, None] = None,
                 env: Optional[dict[str, str]] = None, log_file: Union[str, os.PathLike, None] = None,
                 echo: Optional[TextIO] = None, ready: Optional[re.Pattern] = None, tail_lines: int = 200,
                 die_with_parent: bool = True):
        self.command, self.name, self.cwd, self.env = list(command), name, cwd, env
        self.log_file = Path(log_file) if log_file is not None else None
        self.echo, self.ready, self.die_with_parent = echo, ready, die_with_parent
        self.ready_match: Optional[re.Match] = None
        self.proc: Optional[subprocess.Popen] = None
        self.forced = False  # stop() had to SIGKILL
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._lock = threading.Lock()
        self._matched = threading.Event()
        self._reader: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll() if self.proc else None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_members(self) -> list[int]:
        """PIDs of the process and its descendants in its group still alive."""
        return group_members(self.proc.pid) if self.proc else []

    def tail(self, n: Optional[int] = None) -> str:
        with self._lock:
            lines = list(self._tail)
        return "".join(lines[-n:] if n else lines)

    # ------------------------------------------------------------------ start
    def start(self) -> "Supervisor":
        if self.proc is not None:
            raise ProcessError(f"{self.name} was started already")
        if self.log_file is None:
            output, offset = subprocess.PIPE, 0
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file, "ab")
            offset = output.tell()
        command, preexec_fn = launch_settings(self.command, self.die_with_parent)
        try:
            self.proc = subprocess.Popen(
                command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,  # own group: stop() reaches its children
                preexec_fn=preexec_fn)
        finally:
            if output is not subprocess.PIPE:
                output.close()
        if self.log_file is None:
            stream, follow = self.proc.stdout, False
        else:
            stream, follow = open(self.log_file, "rb"), True
            stream.seek(offset)
        self._reader = threading.Thread(target=self._pump, args=(stream, follow), daemon=True,
                                        name=f"{self.name}-output-{self.proc.pid}")
        self._reader.start()
        return self

    def _pump(self, stream, follow: bool) -> None:
        """Hand each output line to _line; a followed file is read until the process has exited."""
        pending, exited = b"", False
        try:
            while True:
                chunk = stream.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        self._line(pending.decode("utf-8", errors="replace"))
                        pending = b""
                    continue
                if not follow or exited:
                    break
                exited = self.proc.poll() is not None  # one more pass reads what it wrote last
                if not exited:
                    time.sleep(0.1)
            if pending:
                self._line(pending.decode("utf-8", errors="replace"))
        finally:
            stream.close()

    def _line(self, line: str) -> None:
        with self._lock:
            self._tail.append(line)
        if self.echo is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or broken echo stream
                self.echo.write(line)
                self.echo.flush()
        if self.ready is not None and self.ready_match is None:
            match = self.ready.search(line)
            if match:
                self.ready_match = match
                self._matched.set()

    # ------------------------------------------------------------------ ready
    def wait_ready(self, timeout: float, probe: Optional[Callable[[], bool]] = None, interval: float = 0.2) -> None:
        """Until the `ready` line has come (or, given a probe, until probe() is true); ProcessError with the
        output's tail if the process exits first or `timeout` seconds pass."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self._matched.wait(0 if probe else interval) or (probe is not None and probe()):
                return
            if self.proc.poll() is not None:
                self._drain()
                raise ProcessError(f"{self.name} exited with code {self.proc.returncode} before it was ready. "
                                   f"Output:\n{self.tail(60)}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} not ready after {timeout:.0f} s. Output:\n{self.tail(60)}")
            if probe is not None:
                time.sleep(interval)

    def _drain(self, timeout: float = 5.0) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 30.0) -> Optional[int]:
        """SIGTERM, then after `grace` seconds SIGKILL to the whole group; then SIGKILL whatever else is
        left in the group (children that outlived it). Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.forced = True
                self._kill_group()
                proc.wait()
        self._reap_group()
        self._drain()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL to the group at once: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_group()
            self.proc.wait()
        self._drain()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _reap_group(self, wait_s: float = 5.0) -> None:
        """Children notice that their parent is gone and exit on their own; give them a moment, then SIGKILL."""
        for attempt in range(2):
            deadline = time.monotonic() + wait_s
            while self.group_members() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.group_members():
                return
            if attempt == 0:
                self._kill_group()
        print(f"{self.name}: processes {self.group_members()} of group {self.proc.pid} survived SIGKILL",
              file=sys.stderr)
