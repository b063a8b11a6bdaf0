"""The search service process: seconds from launch to its ready line, and its memory (RSS), at ready, after
its first search and after its first caption; whether torch is mapped into it. Floor: a bare interpreter
that imports grpc.

    coca bench service [--model coca-tiny --pretrained random] [--runs 3]

Each run starts `python -m search_service.server` on a fresh data dir against one running Triton
(the model's repository, exported once into --cache), waits for its READY line, reads VmRSS from
/proc, searches once and reads it again, captions one photo (8 tokens) and reads it again, then stops
it. Median over the runs.
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import add_model_options, print_json, print_table, sample_images


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench service", description=__doc__.splitlines()[0])
    add_model_options(p, model="coca-tiny")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache", default="data/bench/service")
    return p.parse_args(argv)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def one_run(triton_url: str, photo: bytes) -> dict:
    from clients.coca_client import Client
    from search_service.testing import ServiceProcess

    with tempfile.TemporaryDirectory(prefix="coca-bench-service-") as data:
        started = time.perf_counter()
        with ServiceProcess(data, triton_url) as service:
            ready_s = time.perf_counter() - started
            pid = service.proc.pid
            at_ready = rss_mb(pid)
            with Client(service.address) as client:
                client.search_text("a photo", k=1)
                searched = rss_mb(pid)
                client.caption(photo, max_tokens=8)
            return {"ready_s": ready_s, "rss_ready_mb": at_ready, "rss_searched_mb": searched,
                    "rss_captioned_mb": rss_mb(pid), "torch_mapped": maps_torch(pid)}


def floor() -> dict:
    """A bare interpreter that imports grpc: its start time and RSS."""
    code = "import grpc; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {"start_s": time.perf_counter() - started, "rss_mb": int(out) / 1024}


def main(argv=None) -> int:
    from serving.launcher import TritonServer
    from serving.repository import ensure_repository

    args = parse(argv)
    repository, _ = ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{args.seed}",
                                      args.model, args.pretrained, args.seed)
    photo = io.BytesIO()
    sample_images(1)[0].save(photo, format="JPEG")
    with TritonServer(repository, kill_on_parent_exit=True) as triton:
        runs = [one_run(triton.grpc_url, photo.getvalue()) for _ in range(args.runs)]
    base = floor()
    median = {key: statistics.median(run[key] for run in runs)
              for key in ("ready_s", "rss_ready_mb", "rss_searched_mb", "rss_captioned_mb")}
    torch_mapped = any(run["torch_mapped"] for run in runs)
    print(f"search service process, {args.runs} runs (median); Triton serves {args.model} ({args.pretrained})")
    print_table(["", "service", "floor: python + import grpc"], [
        ["launch -> ready (s)", f"{median['ready_s']:.2f}", f"{base['start_s']:.2f}"],
        ["RSS at ready (MB)", f"{median['rss_ready_mb']:.0f}", f"{base['rss_mb']:.0f}"],
        ["RSS after one search (MB)", f"{median['rss_searched_mb']:.0f}", ""],
        ["RSS after one caption (MB)", f"{median['rss_captioned_mb']:.0f}", ""],
        ["libtorch mapped", "yes" if torch_mapped else "no", "no"],
    ])
    print_json({"benchmark": "service", "model": args.model, "runs": args.runs,
                **{key: round(value, 3) for key, value in median.items()}, "torch_mapped": torch_mapped,
                "floor_start_s": round(base["start_s"], 3), "floor_rss_mb": round(base["rss_mb"], 1)})
    return 0
