"""Reindex figures (README "Reindex to new weights"): re-embedding a live store into another model's weights
vs plain ingest of the same items, and search latency while it runs vs idle, on one service and one box.

    coca bench reindex [--model coca-tiny --pretrained random] [--images 300] [--searches 200]

Two tritonservers: the model exported with random weights of --seed and of --seed + 1. The service (its own
process, fresh data dir) ingests the images through the first (AddImages, one stream: the plain ingest rate),
then reindexes them into the second (Reindex RPC); one client searches back to back during both (the same load on
each rate compared). Search latency (SearchText, k 10) is sampled idle, during the ingest and during the reindex.
Beside them, what the hardware gives: the new model's Triton alone embedding the same images (serving.client,
batches of 16, all in flight).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import add_model_options, print_json, print_table
from .ingest import distinct_jpegs, triton_alone


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench reindex", description=__doc__.splitlines()[0])
    add_model_options(p, model="coca-tiny")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--searches", type=int, default=200, help="idle searches (the p99 baseline)")
    p.add_argument("--cache", default="data/bench/reindex")
    return p.parse_args(argv)


def search_latencies(client, stop: threading.Event, limit: int) -> list[float]:
    """Seconds of SearchText calls back to back until `stop` is set or `limit` calls are done."""
    out = []
    while not stop.is_set() and len(out) < limit:
        started = time.perf_counter()
        client.search_text("a photo", k=10)
        out.append(time.perf_counter() - started)
    return out


def while_searching(client, work):
    """(work()'s value, its seconds) and the latencies of searches made back to back meanwhile (the same search
    load on each path compared)."""
    stop, latencies = threading.Event(), []
    searcher = threading.Thread(target=lambda: latencies.extend(search_latencies(client, stop, 10 ** 9)))
    searcher.start()
    started = time.perf_counter()
    try:
        value = work()
    finally:
        stop.set()
        searcher.join()
    return (value, time.perf_counter() - started), latencies


def p99_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, 99)) if latencies else float("nan")


def main(argv=None) -> int:
    from clients.coca_client import Client, Outcome
    from search_service.testing import ServiceProcess
    from serving.repository import ensure_repository
    from serving.testing import running_triton

    args = parse(argv)
    images = distinct_jpegs(args.images + 16, args.seed)
    warmup, images = images[:16], images[16:]
    repos = [ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{seed}", args.model,
                               args.pretrained, seed)[0] for seed in (args.seed, args.seed + 1)]
    with running_triton(repos[0], timeout=600) as (old_url, _, _), running_triton(repos[1], timeout=600) as (new_url, _, _):
        floor = triton_alone(new_url, images)
        with tempfile.TemporaryDirectory(prefix="coca-reindex-") as data, ServiceProcess(data, old_url) as service, \
                Client(service.address, timeout=600) as client:
            list(client.add(warmup))
            idle = search_latencies(client, threading.Event(), args.searches)
            (added, ingest_s), during_ingest = while_searching(
                client, lambda: sum(r.outcome is Outcome.ADDED for r in client.add(images)))
            (last, reindex_s), during = while_searching(client, lambda: list(client.reindex(
                "start", to_model=args.model, to_pretrained=args.pretrained, triton=new_url))[-1])
            items = client.stats().count
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    ingest_rate, reindex_rate = added / ingest_s, items / reindex_s
    rows = [["new model's Triton alone (serving.client, batches of 16)", f"{floor:.1f}", "", ""],
            ["plain ingest (AddImages)", f"{ingest_rate:.1f}", "1.00", ""],
            [f"reindex ({items} items, into {last.answered_by[:24]}...)", f"{reindex_rate:.1f}",
             f"{reindex_rate / ingest_rate:.2f}", ""],
            [f"search p99, idle ({len(idle)} searches)", "", "", f"{p99_ms(idle):.1f}"],
            [f"search p99, during plain ingest ({len(during_ingest)} searches)", "", "", f"{p99_ms(during_ingest):.1f}"],
            [f"search p99, during the reindex ({len(during)} searches)", "", "", f"{p99_ms(during):.1f}"]]
    print(f"{args.model} ({args.pretrained}), seed {args.seed} -> {args.seed + 1}; {len(images)} distinct JPEGs; "
          f"load average {' '.join(load)} (goals: reindex >= 0.9x ingest, p99 during <= 2x idle)")
    print_table(["path", "items/s", "vs ingest", "p99 ms"], rows)
    print_json({"benchmark": "reindex", "model": args.model, "items": items, "triton_alone": round(floor, 2),
                "ingest_rate": round(ingest_rate, 2), "reindex_rate": round(reindex_rate, 2),
                "rate_ratio": round(reindex_rate / ingest_rate, 3), "p99_idle_ms": round(p99_ms(idle), 2),
                "p99_during_ms": round(p99_ms(during), 2),
                "p99_ratio": round(p99_ms(during) / p99_ms(idle), 3), "searches_during": len(during),
                "p99_during_ingest_ms": round(p99_ms(during_ingest), 2),
                "max_idle_ms": round(max(idle) * 1000, 2), "max_during_ms": round(max(during) * 1000, 2),
                "load_average": [float(x) for x in load], "goal_rate_ratio": 0.9, "goal_p99_ratio": 2.0})
    return 0


if __name__ == "__main__":
    main()
