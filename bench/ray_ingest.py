"""Bulk ingest on Ray Data (`coca index SOURCE --ray`) against single-process `coca index`, same images,
same Triton, a fresh service (its own data dir) for each pass.

    coca bench ingest --ray [--model coca_ViT-B-32 --pretrained random] [--images 256] [--rounds 2]

Passes, in the order A B C (C B A with --rounds 2: drift on this shared machine cancels out in the means):
  A  plain `coca index` (one AddImages stream; the service embeds through Triton)
  B  Ray, the service embeds (read + check + hash + skip-known on Ray, one AddImages stream)
  C  Ray, Ray embeds (an Embedder actor on the Triton endpoint, the service stores the vectors it is given)
Each pass is timed from its start to the last acknowledgement (Ray's actor start-up included); a Ray
pass also from its first batch of outcomes on (the rate a long run settles at: a run pays the actors'
start-up and the pipeline's fill once, whatever its size). The Ray session itself is started once and
its start-up reported apart. Then the parts one worker of each stage
does alone, so that scaling can be projected (images/s = min over stages of workers x per-worker rate):
  read      read_and_check in one process (what one read task does: read, header check, sha256)
  embed     Triton alone: one request per image, IMAGES_IN_FLIGHT (32) open (what one Embedder drives on
            one endpoint: the hardware floor of any path here, as every image is embedded once)
  write     AddImages of precomputed embeddings (what one writer stream costs the service: no model)
  skip      a Ray re-run over stored content (FindContent, nothing embedded or sent)
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import add_model_options, print_json, print_table
from .ingest import distinct_jpegs
from .triton_common import add_encoder_options, encoder_settings, encoder_suffix

PATHS = {"plain": "plain coca index (service embeds)", "ray-service": "Ray, service embeds",
         "ray-embed": "Ray, Ray embeds (1 Triton endpoint)"}


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench ingest --ray", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--ray", action="store_true", help="(how `coca bench ingest` chose this benchmark)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, choices=[1, 2], help="2: A B C C B A")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    add_encoder_options(p)
    p.add_argument("--cache", default="data/bench/ingest")
    return p.parse_args(argv)


def plain_index(address: str, files: list[str]) -> float:
    """What `coca index DIR` does (clients/search_cli.py index): one add_files stream."""
    from clients.coca_client import Client

    with Client(address, timeout=600) as client:
        started = time.perf_counter()
        results = list(client.add_files(files))
        elapsed = time.perf_counter() - started
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    return len(files) / elapsed


def ray_index(address: str, folder: str, tritons: list[str], batch_size: int, expect: str) -> tuple[float, float, float]:
    """(images/s from start to the last acknowledgement, seconds to the first batch of outcomes (actor
    start-up, pipeline fill), images/s after that first batch: the rate a long run settles at)."""
    from clients.ray_ingest.pipeline import IngestPlan, ingest
    from clients.ray_ingest.stages import ServiceTarget

    plan = IngestPlan(sources=[folder], service=ServiceTarget(address, timeout=600), tritons=tritons,
                      batch_size=batch_size)
    started = time.perf_counter()
    arrivals, outcomes = [], []
    for outcome in ingest(plan):
        arrivals.append(time.perf_counter() - started)
        outcomes.append(outcome)
    assert {o.outcome for o in outcomes} == {expect}, {o.outcome for o in outcomes}
    first = arrivals[0]
    after = [t for t in arrivals if t - first > 1e-3]  # outcomes of later batches
    steady = len(after) / (arrivals[-1] - first) if after else float("nan")
    return len(outcomes) / arrivals[-1], first, steady


def read_rate(files: list[str], batch_size: int) -> float:
    from clients.ray_ingest.stages import read_and_check
    from coca.media import DEFAULT_MAX_PIXELS

    started = time.perf_counter()
    for i in range(0, len(files), batch_size):
        read_and_check({"source": np.array(files[i:i + batch_size], dtype=object)}, 32 << 20, DEFAULT_MAX_PIXELS)
    return len(files) / (time.perf_counter() - started)


def triton_rate(url: str, images: list[bytes]) -> tuple[float, np.ndarray]:
    """images/s of one request per image, IMAGES_IN_FLIGHT open (as the Embedder sends them); and the vectors."""
    from clients.ray_ingest.stages import IMAGES_IN_FLIGHT
    from serving.client import TritonCoca

    async def run():
        async with TritonCoca(url) as triton:
            await triton.embed_images(images[:4])  # warm-up
            limit = asyncio.Semaphore(IMAGES_IN_FLIGHT)

            async def one(data):
                async with limit:
                    return (await triton.embed_images([data]))[0]

            started = time.perf_counter()
            vectors = await asyncio.gather(*(one(d) for d in images))
            return len(images) / (time.perf_counter() - started), np.stack(vectors)

    return asyncio.run(run())


def write_rate(address: str, images: list[bytes], vectors: np.ndarray) -> float:
    from clients.coca_client import AddItem, Client

    with Client(address, timeout=600) as client:
        export = client.stats().repository_id
        items = [AddItem(image=d, embedding=v, repository_id=export) for d, v in zip(images, vectors)]
        started = time.perf_counter()
        results = list(client.add(items))
        elapsed = time.perf_counter() - started
    assert all(r.outcome.value == "added" for r in results)
    return len(images) / elapsed


def main(argv=None) -> int:
    import ray

    from clients.ray_ingest.pipeline import ray_session
    from search_service.testing import ServiceProcess
    from serving.launcher import TritonServer
    from serving.repository import ensure_repository

    args = parse(argv)
    images = distinct_jpegs(args.images + 16, args.seed)
    warmup, images = images[:16], images[16:]
    repository, _ = ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{args.seed}{encoder_suffix(args)}",
                                      args.model, args.pretrained, args.seed, encoders=encoder_settings(args))
    rates: dict[str, list[float]] = {name: [] for name in PATHS}  # start to last acknowledgement
    firsts: dict[str, list[float]] = {name: [] for name in PATHS if name != "plain"}  # s to the first batch
    steady: dict[str, list[float]] = {name: [] for name in PATHS if name != "plain"}  # after the first batch
    with tempfile.TemporaryDirectory(prefix="coca-ray-ingest-") as tmp, \
            TritonServer(repository, kill_on_parent_exit=True).start(timeout=600) as triton:  # slow on a loaded box
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = []
        for i, data in enumerate(images):
            files.append(str(folder / f"{i:05d}.jpg"))
            Path(files[-1]).write_bytes(data)
        started = time.perf_counter()
        with ray_session(num_cpus=args.cpus):
            ray_start = time.perf_counter() - started
            floor, vectors = triton_rate(triton.grpc_url, images)
            order = list(PATHS) + (list(PATHS)[::-1] if args.rounds == 2 else [])
            skip = None
            for n, name in enumerate(order):
                with ServiceProcess(Path(tmp) / f"data{n}", triton.grpc_url, "--accept-embeddings") as service:
                    _warm(service.address, warmup)
                    if name == "plain":
                        rates[name].append(plain_index(service.address, files))
                    else:
                        tritons = [triton.grpc_url] if name == "ray-embed" else []
                        rate, first, settled = ray_index(service.address, str(folder), tritons, args.batch_size, "added")
                        rates[name].append(rate), firsts[name].append(first), steady[name].append(settled)
                        if name == "ray-embed" and skip is None:
                            skip = ray_index(service.address, str(folder), tritons, args.batch_size, "duplicate")[0]
            cpus = ray.cluster_resources().get("CPU", 0)
        with ServiceProcess(Path(tmp) / "write", triton.grpc_url, "--accept-embeddings") as service:
            _warm(service.address, warmup)
            writer = write_rate(service.address, images, vectors)
        reader = read_rate(files, args.batch_size)
    means = {name: float(np.mean(r)) for name, r in rates.items()}
    plain = means["plain"]
    settled = {name: float(np.mean(r)) for name, r in steady.items()}
    rows = [[PATHS[name], " / ".join(f"{r:.2f}" for r in rates[name]), f"{means[name]:.2f}",
             f"{means[name] / plain:.2f}", f"{means[name] / floor:.2f}",
             f"{np.mean(firsts[name]):.1f}" if name in firsts else "",
             f"{settled[name]:.2f}" if name in settled else "",
             f"{settled[name] / plain:.2f}" if name in settled else ""] for name in PATHS]
    rows += [["per worker: read task (read + check + sha256)", "", f"{reader:.1f}", "", "", "", "", ""],
             ["per worker: Triton endpoint, Embedder's way (floor)", "", f"{floor:.2f}", "", "1.00", "", "", ""],
             ["per worker: writer stream, embeddings given", "", f"{writer:.1f}", "", "", "", "", ""],
             ["Ray re-run, all content stored (skipped)", "", f"{skip:.1f}", "", "", "", "", ""]]
    print(f"{args.model} ({args.pretrained}); Triton encoders {args.encoder_runtime} {args.encoder_precision}; "
          f"{len(images)} distinct JPEGs; Ray: {cpus:g} CPUs, "
          f"started in {ray_start:.1f} s (not in the passes); passes in order {' '.join(order)}")
    print_table(["path", "images/s per pass", "mean", "vs plain", "vs Triton alone", "1st batch at (s)",
                 "after 1st batch", "vs plain"], rows)
    print_json({"benchmark": "ingest-ray", "model": args.model, "encoders": f"{args.encoder_runtime}-{args.encoder_precision}",
                "images": len(images), "ray_cpus": cpus, "ray_start_s": round(ray_start, 2), "order": order,
                "passes": {name: [round(r, 2) for r in rs] for name, rs in rates.items()},
                "first_batch_s": {name: [round(r, 2) for r in rs] for name, rs in firsts.items()},
                "after_first_batch": {name: [round(r, 2) for r in rs] for name, rs in steady.items()},
                "ratio_ray_service_vs_plain": round(means["ray-service"] / plain, 3),
                "ratio_ray_embed_vs_plain": round(means["ray-embed"] / plain, 3),
                "ratio_after_first_batch": {name: round(v / plain, 3) for name, v in settled.items()},
                "target_ratio": 0.9, "triton_alone": round(floor, 2),
                "per_worker": {"read": round(reader, 1), "triton_endpoint": round(floor, 2),
                               "writer_stream": round(writer, 1), "skip_known": round(skip, 1)}})
    return 0


def _warm(address: str, warmup: list[bytes]) -> None:
    """The service's first AddImages binds the model and opens the index: not part of any pass."""
    from clients.coca_client import Client

    with Client(address, timeout=600) as client:
        list(client.add(warmup[:2]))
