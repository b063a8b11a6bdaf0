"""What the export paths cost a server: ensure_repository, tritonserver start, RSS, side by side in one run.

    coca bench export-defaults --model coca-tiny --pretrained random --rounds 2

Per path (torch encoders + the step protocol alone, vs ONNX Runtime encoders + coca_captioner), in turns so
both see the same background load: an export into a fresh folder (torch and coca already imported, as in a
test session), then a tritonserver start on it to READY and the RSS of its process group 3 s later. The floor
beside the start time: the quickest start of the torch path, which loads one model process fewer.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .common import print_json, print_table

PATHS = {"torch+sequence": ("torch", "sequence"), "onnx+iterative": ("onnxruntime", "iterative")}


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench export-defaults", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coca-tiny")
    p.add_argument("--pretrained", default="random")
    p.add_argument("--rounds", type=int, default=2, help="exports and starts of each path, in turns")
    return p.parse_args(argv)


def rss_mb(pids: list[int]) -> int:
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                total_kb += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration):  # gone meanwhile
            pass
    return round(total_kb / 1024)


def measure(model: str, pretrained: str, runtime: str, scheduler: str) -> dict:
    from serving.launcher import TritonServer
    from serving.repository import EncoderSettings, ensure_repository

    repository = Path(tempfile.mkdtemp(prefix="bench-export-")) / "repo"
    started = time.monotonic()
    ensure_repository(repository, model, pretrained, encoders=EncoderSettings(runtime), decoder_scheduler=scheduler)
    export_s = time.monotonic() - started
    server = TritonServer(repository, kill_on_parent_exit=True)
    started = time.monotonic()
    server.start(600)
    start_s = time.monotonic() - started
    try:
        time.sleep(3.0)
        pids = server.process_group_members()
        return dict(export_s=export_s, start_s=start_s, rss_mb=rss_mb(pids), processes=len(pids))
    finally:
        server.stop()


def main(argv=None) -> int:
    import coca  # noqa: F401  (imported before the clock starts, as in a test session)

    args = parse(argv)
    runs = {name: [] for name in PATHS}
    measure(args.model, args.pretrained, *PATHS["torch+sequence"])  # warm: the first export loads more
    for _ in range(args.rounds):
        for name, (runtime, scheduler) in PATHS.items():
            runs[name].append(measure(args.model, args.pretrained, runtime, scheduler))
    best = {name: {key: min(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()}
    base = best["torch+sequence"]
    rows = [[name, f"{b['export_s']:.2f}", f"{b['start_s']:.1f}", f"{b['start_s'] / base['start_s']:.2f}x",
             b["rss_mb"], b["processes"]] for name, b in best.items()]
    print_table(["path", "export s (best)", "start s (best)", "start vs torch+sequence (floor)", "RSS MB", "processes"],
                rows)
    print_json({"benchmark": "export-defaults", "model": args.model, "rounds": args.rounds, "best": best, "runs": runs})
    return 0
