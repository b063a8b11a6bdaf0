"""Reindex figures (README "Reindex to new weights"): re-embedding a live store into another model's weights
vs plain ingest of the same items, and search latency while it runs vs idle, on one service and one box.

    coca bench reindex [--model coca-tiny --pretrained random] [--images 300] [--searches 200] [--reindex-share F]
                       [--vector-store milvus [--milvus-uri URI]]

Two tritonservers: the model exported with random weights of --seed and of --seed + 1. The service (its own
process, fresh data dir, --reindex-share as given: the throttle) ingests the images through the first (AddImages,
one stream, nothing else asked: the plain ingest rate); then search latency (SearchText, k 10, one client back to
back) is sampled idle and during a reindex into the second (Reindex RPC); then, the old generation dropped, a
reindex back into the first with nothing else asked (the reindex rate compared with ingest: the throttle holds a
reindex back only while searches are about). Beside them, what the hardware gives: the new model's Triton alone
embedding the same images (serving.client, batches of 16, all in flight). With --vector-store milvus the service
keeps a new collection (HNSW) in the Milvus at --milvus-uri, or in a Milvus standalone of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import threading
import time
from pathlib import Path

from search_service.config import ServiceConfig
from search_service.testing import while_searching

from .common import add_model_options, milvus_uri, print_json, print_table
from .ingest import distinct_jpegs, triton_alone


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench reindex", description=__doc__.splitlines()[0])
    add_model_options(p, model="coca-tiny")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--searches", type=int, default=200, help="idle searches (the p99 baseline)")
    p.add_argument("--reindex-share", type=float, default=ServiceConfig.reindex_share, metavar="F",
                   help="the service's --reindex-share (1: no throttle; default %(default)s, the service's)")
    p.add_argument("--search-seconds", type=float, default=20.0, metavar="S",
                   help="search back to back for the first S seconds of the first reindex (default %(default)s; the "
                        "throttle slows the reindex to its --reindex-share meanwhile)")
    p.add_argument("--cache", default="data/bench/reindex")
    p.add_argument("--vector-store", choices=["faiss", "milvus"], default="faiss")
    p.add_argument("--milvus-uri", help="a running Milvus (default: a standalone of its own under --cache)")
    return p.parse_args(argv)


def store_options(args, stack: contextlib.ExitStack) -> list[str]:
    """The service's store options: the embedded store, or a new collection in Milvus."""
    if args.vector_store == "faiss":
        return []
    uri = milvus_uri(args.milvus_uri, Path(args.cache) / "milvus", stack)
    return ["--vector-store", "milvus", "--milvus-uri", uri, "--collection", f"bench_reindex_{time.time_ns()}"]


def embedded_now(client) -> int:
    """Items the running reindex has embedded (Stats.reindex "...: embedding N/M items"; 0 when none says)."""
    found = re.search(r"(\d+)/\d+ items", client.stats().reindex)
    return int(found[1]) if found else 0


def searched_reindex(client, reindex, seconds: float):
    """reindex()'s value, the latencies of searches made back to back during its first `seconds`, and (seconds
    searched, items embedded meanwhile)."""
    stop, window, started = threading.Event(), [], time.perf_counter()

    def end_window():
        window.append((time.perf_counter() - started, embedded_now(client)))
        stop.set()

    timer = threading.Timer(seconds, end_window)
    timer.start()
    try:
        (last, reindex_s), during = while_searching(client, reindex, stop)
    finally:
        timer.cancel()
    return last, during, window[0] if window else (reindex_s, last.total)


def reindex_to(client, model: str, pretrained: str, triton: str):
    """The last progress message of a reindex into the weights `triton` serves."""
    return list(client.reindex("start", to_model=model, to_pretrained=pretrained, triton=triton))[-1]


def main(argv=None) -> int:
    from clients.coca_client import Client, Outcome
    from search_service.testing import ServiceProcess, p99_ms, search_latencies, timed
    from serving.repository import ensure_repository
    from serving.testing import running_triton

    args = parse(argv)
    images = distinct_jpegs(args.images + 16, args.seed)
    warmup, images = images[:16], images[16:]
    repos = [ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{seed}", args.model,
                               args.pretrained, seed)[0] for seed in (args.seed, args.seed + 1)]
    with contextlib.ExitStack() as stack:
        old_url, _, _ = stack.enter_context(running_triton(repos[0], timeout=600))
        new_url, _, _ = stack.enter_context(running_triton(repos[1], timeout=600))
        floor = triton_alone(new_url, images)
        data = stack.enter_context(tempfile.TemporaryDirectory(prefix="coca-reindex-"))
        service = stack.enter_context(ServiceProcess(data, old_url, "--reindex-share", str(args.reindex_share),
                                                     *store_options(args, stack)))
        with Client(service.address, timeout=600) as client:
            list(client.add(warmup))
            (added, ingest_s) = timed(lambda: sum(r.outcome is Outcome.ADDED for r in client.add(images)))
            idle = search_latencies(client, threading.Event(), args.searches)
            last, during, (searched_s, searched_items) = searched_reindex(
                client, lambda: reindex_to(client, args.model, args.pretrained, new_url), args.search_seconds)
            items = client.stats().count
            list(client.reindex("drop_old"))
            _, reindex_s = timed(lambda: reindex_to(client, args.model, args.pretrained, old_url))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    ingest_rate, reindex_rate, searched_rate = added / ingest_s, items / reindex_s, searched_items / searched_s
    p99_ratio = p99_ms(during) / p99_ms(idle)
    rows = [["new model's Triton alone (serving.client, batches of 16)", f"{floor:.1f}", "", ""],
            ["plain ingest (AddImages), nothing else asked", f"{ingest_rate:.1f}", "1.00", ""],
            [f"reindex ({items} items), nothing else asked", f"{reindex_rate:.1f}", f"{reindex_rate / ingest_rate:.2f}",
             ""],
            [f"search p99, idle ({len(idle)} searches)", "", "", f"{p99_ms(idle):.1f}"],
            [f"reindex, {searched_s:.0f} s of back-to-back searches; their p99 ({len(during)} searches)",
             f"{searched_rate:.1f}",
             f"{searched_rate / ingest_rate:.2f}", f"{p99_ms(during):.1f} ({p99_ratio:.2f}x idle)"]]
    print(f"{args.model} ({args.pretrained}), seed {args.seed} -> {args.seed + 1} -> {args.seed}; {args.vector_store}; "
          f"{len(images)} "
          f"distinct JPEGs; --reindex-share {args.reindex_share:g}; load average {' '.join(load)} (goals: reindex >= "
          "0.9x ingest, p99 during <= 2x idle)")
    print_table(["path", "items/s", "vs ingest", "p99 ms"], rows)
    print_json({"benchmark": "reindex", "model": args.model, "vector_store": args.vector_store, "items": items, "reindex_share": args.reindex_share,
                "triton_alone": round(floor, 2), "ingest_rate": round(ingest_rate, 2),
                "reindex_rate": round(reindex_rate, 2), "rate_ratio": round(reindex_rate / ingest_rate, 3),
                "reindex_rate_searched": round(searched_rate, 2), "p99_idle_ms": round(p99_ms(idle), 2),
                "p99_during_ms": round(p99_ms(during), 2), "p99_ratio": round(p99_ratio, 3),
                "searches_during": len(during), "answered_by": last.answered_by,
                "max_idle_ms": round(max(idle) * 1000, 2), "max_during_ms": round(max(during) * 1000, 2),
                "load_average": [float(x) for x in load], "goal_rate_ratio": 0.9, "goal_p99_ratio": 2.0})
    return 0


if __name__ == "__main__":
    main()
