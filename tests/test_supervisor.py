"""serving.supervisor: the one process supervisor (Triton, the search service, `coca serve` use it).
Real child processes: small Python programs."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from serving.supervisor import ProcessError, Supervisor, group_members

READY = re.compile(r"ready on (\d+)")


def program(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


SERVER = """
    import sys, time
    print("starting")
    print("partial ", end="", flush=True); time.sleep(0.3); print("line")
    print("ready on 4711", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("to_file", [False, True], ids=["pipe", "log-file"])
def test_ready_line_output_and_sigterm(tmp_path, to_file):
    log = tmp_path / "child.log" if to_file else None
    process = Supervisor(program(SERVER), name="child", ready=READY, log_file=log).start()
    process.wait_ready(30)
    assert process.ready_match.group(1) == "4711"
    assert process.tail() == "starting\npartial line\nready on 4711\n"
    assert process.stop(grace=10) == -signal.SIGTERM and not process.forced
    assert group_members(process.pid) == []
    if to_file:
        assert log.read_text() == "starting\npartial line\nready on 4711\n"


def test_exit_before_ready_says_why_with_the_output():
    process = Supervisor(program("print('bad flag --x'); raise SystemExit(3)"), name="child", ready=READY).start()
    with pytest.raises(ProcessError, match=r"(?s)child exited with code 3 before it was ready.*bad flag --x"):
        process.wait_ready(30)


def test_not_ready_in_time():
    process = Supervisor(program("import time; print('slow'); time.sleep(60)"), name="child", ready=READY).start()
    try:
        with pytest.raises(ProcessError, match=r"(?s)child not ready after 1 s.*slow"):
            process.wait_ready(1)
    finally:
        process.stop(grace=5)


def test_sigterm_ignored_then_sigkill_reaches_the_whole_group():
    code = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        print("ready on", child.pid, flush=True)
        time.sleep(60)
    """
    process = Supervisor(program(code), name="stubborn", ready=READY).start()
    process.wait_ready(30)
    grandchild = int(process.ready_match.group(1))
    assert set(process.group_members()) == {process.pid, grandchild}
    assert process.stop(grace=1) == -signal.SIGKILL and process.forced
    assert wait_until(lambda: not alive(grandchild)) and process.group_members() == []


def test_child_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: a supervisor's process that is SIGKILLed takes its child with it."""
    parent = """
        import re, sys
        from serving.supervisor import Supervisor
        child = Supervisor([sys.executable, "-u", "-c", "import time; print('ready on 1'); time.sleep(60)"],
                           name="child", ready=re.compile("ready")).start()
        child.wait_ready(30)
        print(child.pid, flush=True)
        import time; time.sleep(60)
    """
    proc = subprocess.Popen(program(parent), stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert alive(child)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not alive(child)), "the child outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_children_start_while_other_threads_are_inside_grpc():
    """A start from a process whose other threads are in gRPC calls (a test's clients while it restarts
    a Triton): with a preexec_fn the child ran Python between fork and exec, and 2 of 200 such starts
    died of SIGABRT in abseil's mutex code before exec. setpriv sets the parent-death signal instead."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from serving.supervisor import launch_settings

    assert launch_settings(["true"], True)[1] is None  # no Python in the child (setpriv is in util-linux)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def call_in_a_loop():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while not stop.is_set():
                check(health_pb2.HealthCheckRequest())

    threads = [threading.Thread(target=call_in_a_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        codes = [Supervisor(["true"], name="true").start().proc.wait() for _ in range(300)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(0)
    assert codes == [0] * 300, {code: codes.count(code) for code in set(codes)}
