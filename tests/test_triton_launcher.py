"""The real tritonserver (from the nvidia-pytriton wheel) started by serving.launcher.

Uses the probe models in tests/triton_models/ (see serving/NOTES.md for what they showed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.launcher import TritonServer
from serving.supervisor import group_members
from serving.testing import running_triton, triton_unavailable_reason

grpcclient = pytest.importorskip("tritonclient.grpc")
grpcaio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = Path(__file__).resolve().parent / "triton_models"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

SEQ_OUTPUTS = ["BATCH_SIZE", "COUNT", "CORRID", "FLAGS", "EXEC_ID", "LIVE", "EMBED_SUM", "TEXT_LEN"]


@pytest.fixture(scope="module")
def triton():
    with running_triton(MODELS) as (grpc_url, http_url, server):
        yield grpc_url, http_url, server


# ----------------------------------------------------------------------------- helpers


def _token(value, dtype=np.int64, shape=(1, 1)):
    t = grpcclient.InferInput("TOKEN", list(shape), "INT64" if dtype == np.int64 else "INT32")
    t.set_data_from_numpy(np.full(shape, value, dtype=dtype))
    return t


def _embed(values):
    t = grpcclient.InferInput("EMBED", [1, 4], "FP32")
    t.set_data_from_numpy(np.asarray(values, dtype=np.float32).reshape(1, 4))
    return t


async def _step(client, seq_id, token, *, start=False, end=False, extra=()):
    result = await client.infer(
        "seq_probe", [_token(token), *extra], sequence_id=seq_id, sequence_start=start, sequence_end=end
    )
    return {k: result.as_numpy(k).reshape(-1)[0].item() for k in SEQ_OUTPUTS}


async def _expect_error(coro) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        await coro
    return info.value


def _procs_mentioning(text: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(d))
            except OSError:
                pass
    return found


def _small_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "seq_probe", repo / "seq_probe", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


# ----------------------------------------------------------------------------- tests


def test_stub_uses_our_venv(triton):
    grpc_url, http_url, server = triton

    async def go():
        client = grpcaio.InferenceServerClient(grpc_url)
        try:
            dummy = grpcclient.InferInput("DUMMY", [1], "INT64")
            dummy.set_data_from_numpy(np.array([1], dtype=np.int64))
            result = await client.infer("env_probe", [dummy])
            return json.loads(result.as_numpy("INFO")[0].decode())
        finally:
            await client.close()

    info = asyncio.run(go())
    import torch

    assert Path(info["prefix"]) == Path(sys.prefix)
    assert info["torch"] == torch.__version__ and info["torch_sum"] == 6.0
    assert info["numpy"] == np.__version__
    assert list(info["version"]) == list(sys.version_info[:3])
    assert info["isolated"] == 1  # PYTHONPATH is ignored in the stub
    assert Path(info["cwd"]) != ROOT  # the launcher runs it in an empty private directory
    if server.python.libdir is not None:  # same libpython as the venv's interpreter
        assert info["libpython"] and all(p.startswith(str(server.python.libdir)) for p in info["libpython"])
    # Our packages are importable in the stub exactly when they are installed in the venv
    # (pip install -e .): compare with an isolated interpreter started outside the repo.
    probe = "import importlib.util as u, json; print(json.dumps({n: (u.find_spec(n) or 0) and u.find_spec(n).origin or None for n in ('coca', 'serving')}))"
    host = json.loads(subprocess.run([sys.executable, "-I", "-c", probe], cwd="/", capture_output=True, text=True, check=True).stdout)
    assert info["coca"] == host["coca"]
    assert info["serving"] == host["serving"]


def test_interleaved_sequences_are_batched_and_counted(triton):
    grpc_url, _, _ = triton
    n_seq = 16
    lengths = [1 + (i * 7) % 12 for i in range(n_seq)]  # 1..12 steps, ragged, one START+END
    base = 10_000

    async def go():
        client = grpcaio.InferenceServerClient(grpc_url)
        try:

            async def sequence(i):
                out = []
                for s in range(lengths[i]):
                    extra = (_embed([i, 1, 0, 0]),) if s == 0 else ()
                    out.append(await _step(client, base + i, 100 + s, start=s == 0, end=s == lengths[i] - 1, extra=extra))
                return out

            t0 = time.perf_counter()
            results = await asyncio.gather(*(sequence(i) for i in range(n_seq)))
            return results, time.perf_counter() - t0
        finally:
            await client.close()

    results, elapsed = asyncio.run(go())
    by_exec = collections.defaultdict(list)
    for i, steps in enumerate(results):
        assert len(steps) == lengths[i]
        for s, r in enumerate(steps):
            assert r["CORRID"] == base + i
            assert r["COUNT"] == s + 1, f"sequence {i} step {s}: {r}"
            expected_flags = (1 if s == 0 else 0) | (2 if s == lengths[i] - 1 else 0)
            assert r["FLAGS"] == expected_flags
            assert r["EMBED_SUM"] == pytest.approx(i + 1.0)  # optional input kept from START
            by_exec[r["EXEC_ID"]].append(r)
    # Each execute() call answered all of its requests, at most one per sequence.
    for exec_id, rs in by_exec.items():
        assert len(rs) == rs[0]["BATCH_SIZE"]
        assert len({r["CORRID"] for r in rs}) == len(rs)
    sizes = [rs[0]["BATCH_SIZE"] for rs in by_exec.values()]
    assert max(sizes) > 1, f"no batching seen: {sizes}"
    print(f"\n{sum(lengths)} steps of {n_seq} sequences in {elapsed * 1e3:.0f} ms; batch sizes {sorted(sizes)}")


def test_errors_come_back_and_server_keeps_serving(triton):
    grpc_url, _, server = triton
    base = 20_000

    async def go():
        client = grpcaio.InferenceServerClient(grpc_url)
        try:
            # First request of a sequence without START: rejected by Triton's sequence batcher.
            e = await _expect_error(_step(client, base + 1, 1))
            assert "StatusCode.INVALID_ARGUMENT" in e.status() and "START" in e.message()
            # Correlation id 0 is not a sequence.
            e = await _expect_error(_step(client, 0, 1, start=True))
            assert "StatusCode.INVALID_ARGUMENT" in e.status() and "correlation ID" in e.message()
            # Wrong dtype / wrong shape: rejected before the model runs.
            e = await _expect_error(
                client.infer("seq_probe", [_token(1, np.int32)], sequence_id=base + 2, sequence_start=True)
            )
            assert "StatusCode.INVALID_ARGUMENT" in e.status() and "INT32" in e.message()
            e = await _expect_error(
                client.infer("seq_probe", [_token(1, shape=(1, 2))], sequence_id=base + 3, sequence_start=True)
            )
            assert "StatusCode.INVALID_ARGUMENT" in e.status() and "shape" in e.message()

            # A per-request error from the model (TritonError with INVALID_ARG) fails only that
            # request of a batch; its neighbours succeed.
            async def one(i):
                try:
                    return await _step(client, base + 10 + i, -1 if i == 3 else 1, start=True, end=True)
                except InferenceServerException as exc:
                    return exc

            outcomes = await asyncio.gather(*(one(i) for i in range(8)))
            for i, o in enumerate(outcomes):
                if i == 3:
                    assert isinstance(o, InferenceServerException)
                    assert "StatusCode.INVALID_ARGUMENT" in o.status() and "TOKEN must be >= 0" in o.message()
                else:
                    assert isinstance(o, dict) and o["COUNT"] == 1 and o["FLAGS"] == 3

            # Still serving: a fresh sequence runs to its end.
            counts = [(await _step(client, base + 99, 5, start=s == 0, end=s == 2))["COUNT"] for s in range(3)]
            assert counts == [1, 2, 3]
        finally:
            await client.close()

    asyncio.run(go())
    assert server.is_alive()


def test_bytes_inputs_with_dynamic_batching(triton):
    grpc_url, _, _ = triton

    async def go():
        client = grpcaio.InferenceServerClient(grpc_url)
        try:

            async def one(i):
                data = grpcclient.InferInput("DATA", [1, 1], "BYTES")
                data.set_data_from_numpy(np.array([[b"x" * i]], dtype=np.object_))
                r = await client.infer("bytes_probe", [data])
                return r.as_numpy("LEN").item(), r.as_numpy("BATCH_SIZE").item(), r.as_numpy("INFO").item().decode()

            return await asyncio.gather(*(one(i) for i in range(1, 9)))
        finally:
            await client.close()

    results = asyncio.run(go())
    assert [r[0] for r in results] == list(range(1, 9))
    # Each request arrives as its own (1, 1) object array of bytes; the model stacks them itself.
    assert all(r[2] == "shape=(1, 1) dtype=object type0=bytes" for r in results)
    assert max(r[1] for r in results) > 1


def test_idle_sequences_are_dropped_without_telling_the_model(triton):
    grpc_url, _, _ = triton
    base = 30_000

    async def go():
        client = grpcaio.InferenceServerClient(grpc_url)
        try:
            await _step(client, base, 1, start=True)
            await asyncio.sleep(4.5)  # max_sequence_idle_microseconds is 3 s in seq_probe
            e = await _expect_error(_step(client, base, 2))
            assert "StatusCode.INVALID_ARGUMENT" in e.status() and "START" in e.message()
            # The model never got an END for it: its entry is still in the model's dict.
            r = await _step(client, base + 1, 1, start=True, end=True)
            assert r["LIVE"] >= 1
        finally:
            await client.close()

    asyncio.run(go())


def test_stop_leaves_no_processes(tmp_path):
    server = TritonServer(_small_repo(tmp_path), kill_on_parent_exit=True)
    server.start()
    try:
        pgid, workdir, shm_prefix = server.pid, str(server.workdir), server.shm_region_prefix
        members = server.process_group_members()
        assert pgid in members and len(members) >= 2  # tritonserver + one stub
        assert len(_procs_mentioning(workdir)) >= 2  # stubs get the private backend dir on their cmdline
        assert [p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix)]
    finally:
        rc = server.stop()
    assert rc == 0
    assert group_members(pgid) == []
    assert _procs_mentioning(workdir) == []
    assert not Path(workdir).exists()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(shm_prefix)]


def test_a_port_taken_before_tritonserver_binds_it_is_picked_again(tmp_path, monkeypatch):
    """The race CI lost: a port picked free here is taken by another process before tritonserver binds it.
    The launcher starts it again on fresh ports; the taker keeps its port."""
    import socket

    import serving.launcher as launcher

    taker = socket.socket()
    taker.bind(("127.0.0.1", 0))
    taker.listen()
    taken = taker.getsockname()[1]
    picks = []
    real_pick = launcher.pick_free_ports

    def pick_after_a_theft(n=3, host="127.0.0.1"):
        ports = real_pick(n, host)
        if not picks:
            ports[1] = taken  # gRPC: taken by another process meanwhile
        picks.append(ports)
        return ports

    monkeypatch.setattr(launcher, "pick_free_ports", pick_after_a_theft)
    server = TritonServer(_small_repo(tmp_path), kill_on_parent_exit=True)
    try:
        server.start(timeout=120)
        assert len(picks) == 2 and server.grpc_port == picks[1][1] != taken
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("seq_probe")
        client.close()
    finally:
        server.stop()
        taker.close()


def test_cli_runs_until_sigterm(tmp_path):
    """Ports given as 0 are picked by the launcher (tritonserver cannot bind 0 for its three servers) and
    read back from its ready line."""
    repo = _small_repo(tmp_path)
    cmd = [sys.executable, "-m", "serving.launcher", "--model-repository", str(repo),
           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pid = [], None
    try:
        deadline = time.monotonic() + 90
        while pid is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                m = re.search(r"\[serving\.launcher\] ready: grpc (127\.0\.0\.1:\d+) .*\(pid (\d+);", line)
                if m:
                    grpc, pid = m.group(1), int(m.group(2))
        assert pid is not None, "".join(lines[-40:])
        client = grpcclient.InferenceServerClient(grpc)
        assert client.is_model_ready("seq_probe")
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "stopped (tritonserver exit code 0)" in out
    assert group_members(pid) == []
