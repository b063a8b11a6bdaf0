"""Ingest speed: images/s through the whole service (gRPC AddImages -> Triton -> SQLite + FAISS)
against in-process `embed_images` at its best batch size, same model, same images.

    coca bench ingest [--model coca_ViT-B-32 --pretrained random] [--images 256] [--batch-sizes 1,4,8,16]
    coca bench ingest --ray ...   (bench/ray_ingest.py: Ray Data bulk ingest vs plain `coca index`)

Images are distinct JPEGs (random crops of scikit-image's sample photos, 512 px on the long side),
so no item is skipped as a duplicate. The service runs in its own process with a fresh data dir
(synchronous=FULL: one WAL fsync per committed batch, plus one per stored image file); the
client streams every image in one AddImages call and the clock stops at the last
acknowledgement. The in-process baseline: a sweep of batch sizes over --in-process-images picks
the best batch; that batch then embeds the same images as the service, once before the servers
start and once after they stop, and the ratio is taken against the mean of the two (this machine's
load drifts by the minute; the ratio against the faster of the two is reported too). Also
reported: Triton alone (serving.client embed_images, batches of 16, all in flight at once), to
tell the service's own cost from Triton's.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path


from .common import add_model_options, distinct_images, print_json, print_table
from .triton_common import add_encoder_options, encoder_settings, encoder_suffix


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench ingest", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--images", type=int, default=256, help="images sent through the service")
    p.add_argument("--in-process-images", type=int, default=64, help="images per in-process batch-size trial")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    add_encoder_options(p)
    p.add_argument("--cache", default="data/bench/ingest")
    return p.parse_args(argv)


def distinct_jpegs(count: int, seed: int, side: int = 512) -> list[bytes]:
    out = []
    for crop in distinct_images(count, seed, side):
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    assert len(set(out)) == count, "crops collided"
    return out


def in_process_rate(model, images: list[bytes], batch: int) -> float:
    """images/s of coca's embed_images (decode + preprocess + encode) at one batch size."""
    started = time.perf_counter()
    model.embed_images(images, batch_size=batch)
    return len(images) / (time.perf_counter() - started)


def triton_alone(url: str, images: list[bytes]) -> float:
    from serving.client import TritonCoca

    async def run():
        async with TritonCoca(url) as client:
            await client.embed_images(images[:16])  # warm-up
            started = time.perf_counter()
            await client.embed_images(images, batch_size=16)
            return len(images) / (time.perf_counter() - started)

    return asyncio.run(run())


def through_service(url: str, images: list[bytes], warmup: list[bytes]) -> tuple[float, int]:
    from clients.coca_client import Client, Outcome
    from search_service.testing import ServiceProcess

    with tempfile.TemporaryDirectory(prefix="coca-ingest-") as data, ServiceProcess(data, url) as service, \
            Client(service.address) as client:
        list(client.add(warmup))
        started = time.perf_counter()
        results = list(client.add(images))
        elapsed = time.perf_counter() - started
    added = sum(r.outcome is Outcome.ADDED for r in results)
    return len(images) / elapsed, added


def main(argv=None) -> int:
    if argv and "--ray" in argv:  # Ray Data bulk ingest vs plain `coca index`: its own program
        from .ray_ingest import main as ray_main

        return ray_main(argv)
    from serving.repository import ensure_repository
    from serving.launcher import TritonServer

    args = parse(argv)
    images = distinct_jpegs(args.images + 16, args.seed)
    warmup, images = images[:16], images[16:]
    import coca

    trial = images[: args.in_process_images]
    model = coca.load(args.model, pretrained=args.pretrained, seed=args.seed)
    model.embed_images(warmup[:8], batch_size=8)  # warm-up
    sweep = {int(b): in_process_rate(model, trial, int(b)) for b in args.batch_sizes.split(",")}
    best_batch = max(sweep, key=sweep.get)
    before = in_process_rate(model, images, best_batch)
    repository, _ = ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{args.seed}{encoder_suffix(args)}",
                                      args.model, args.pretrained, args.seed, encoders=encoder_settings(args))
    with TritonServer(repository, kill_on_parent_exit=True).start(timeout=600) as triton:  # slow on a loaded box
        direct = triton_alone(triton.grpc_url, images)
        service_rate, added = through_service(triton.grpc_url, images, warmup)
    after = in_process_rate(model, images, best_batch)
    baseline = (before + after) / 2
    rows = [[f"in-process embed_images, batch {b} ({len(trial)} images)", f"{r:.2f}", f"{r / baseline:.2f}"]
            for b, r in sweep.items()]
    rows += [[f"in-process, batch {best_batch}, all images: before / after", f"{before:.2f} / {after:.2f}",
              f"{before / baseline:.2f} / {after / baseline:.2f}"],
             ["Triton alone (client, batches of 16)", f"{direct:.2f}", f"{direct / baseline:.2f}"],
             [f"service AddImages ({added} added)", f"{service_rate:.2f}", f"{service_rate / baseline:.2f}"]]
    print(f"{args.model} ({args.pretrained}); {len(images)} distinct JPEGs; Triton encoders: {args.encoder_runtime} "
          f"{args.encoder_precision}; baseline = in-process eager torch embed_images, mean of before and after = "
          f"{baseline:.2f} images/s (targets: service >= 0.95x with torch encoders, >= 1.3x with ONNX Runtime)")
    print_table(["path", "images/s", "vs in-process"], rows)
    print_json({"benchmark": "ingest", "model": args.model, "images": len(images), "added": added,
                "in_process_sweep": {str(b): round(r, 2) for b, r in sweep.items()}, "best_batch": best_batch,
                "in_process_before": round(before, 2), "in_process_after": round(after, 2),
                "triton_alone": round(direct, 2), "service": round(service_rate, 2),
                "ratio": round(service_rate / baseline, 3),
                "ratio_vs_faster_baseline": round(service_rate / max(before, after), 3),
                "encoder_runtime": args.encoder_runtime, "encoder_precision": args.encoder_precision,
                "target_ratio": 0.95 if args.encoder_runtime == "torch" else 1.3})
    return 0
