"""Image embedding speed: Triton's coca_image_encoder vs in-process `embed_images`, same batch size.

    coca bench triton-encode --model coca_ViT-B-32 --pretrained random --batch-size 8 --images 32

Both sides get the same JPEG bytes and decode, preprocess and encode them; Triton gets
one request of --batch-size images at a time (so its batches equal the in-process
ones), over gRPC from this process. The two are timed in turns, best of --repeats
each; ratio = Triton images/s / in-process images/s. Also checks the embeddings agree.

--perf-analyzer cross-checks the Triton figure with NVIDIA's perf_analyzer
(scripts/perf_analyzer.sh) at batch 1, one request at a time, against this client
timed the same way; both ask for every output (perf_analyzer cannot choose).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import subprocess
import tempfile
import time

import numpy as np

from .common import print_json, print_table, sample_images
from .triton_common import add_server_options, served_repository


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench triton-encode", description=__doc__.splitlines()[0])
    add_server_options(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--perf-analyzer", action="store_true", help="also measure batch 1 with NVIDIA's perf_analyzer")
    return p.parse_args(argv)


def jpegs(count: int) -> list[bytes]:
    out = []
    for photo in sample_images(count):
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


EVERY_OUTPUT = ("CLASS_EMBEDDING", "IMAGE_EMBEDDINGS", "ATTENTION")  # what perf_analyzer asks for


async def triton_run(url: str, images: list[bytes], batch_size: int,
                     outputs=("CLASS_EMBEDDING",)) -> tuple[float, np.ndarray]:
    """Seconds to encode `images` one request per batch, in turn (after a warm-up), and the ClassEmbeddings."""
    from serving.client import TritonCoca

    async with TritonCoca(url) as triton:
        await triton.encode_images(images[:batch_size], outputs, batch_size)  # warm-up: a fresh channel
        start = time.perf_counter()
        parts = [await triton.encode_images(images[i : i + batch_size], outputs, batch_size)
                 for i in range(0, len(images), batch_size)]
        return time.perf_counter() - start, np.concatenate([part["CLASS_EMBEDDING"] for part in parts])


def perf_analyzer_images_per_s(url: str, images: list[bytes], seconds: float = 5.0) -> float:
    """Throughput perf_analyzer measures for coca_image_encoder, one image per request, one in flight."""
    import numpy as np
    from tritonclient.utils import serialize_byte_tensor

    from serving.protocol import IMAGE_ENCODER

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as data:
        # perf_analyzer reads a BYTES input as a serialized tensor (length-prefixed elements)
        steps = [{"IMAGE": {"b64": base64.b64encode(serialize_byte_tensor(np.array([image], np.object_)).item()).decode()}}
                 for image in images]
        json.dump({"data": steps}, data)
    command = ["scripts/perf_analyzer.sh", "-m", IMAGE_ENCODER, "-u", url, "-i", "grpc", "-b", "1",
               "--input-data", data.name, "--concurrency-range", "1", "--measurement-interval", str(int(seconds * 1000)),
               "--stability-percentage", "30", "--max-trials", "10"]  # this machine is shared and noisy
    print(" ".join(command), flush=True)
    run = subprocess.run(command, capture_output=True, text=True)
    output = run.stdout + run.stderr
    found = re.search(r"Concurrency: 1, throughput: ([0-9.]+) infer/sec", output)
    if not found:
        raise RuntimeError(f"perf_analyzer gave no throughput:\n{output[-2000:]}")
    return float(found.group(1))


def main(argv=None) -> int:
    import coca

    args = parse(argv)
    images = jpegs(args.images)
    model = coca.load(args.model, pretrained=args.pretrained, seed=args.seed, dtype=args.dtype)
    model.embed_images(images[: args.batch_size], batch_size=args.batch_size)  # warm-up
    local_times, triton_times = [], []
    with served_repository(args) as (url, identity):
        for _ in range(args.repeats):  # in turns, so both see the same background load
            start = time.perf_counter()
            expected = model.embed_images(images, batch_size=args.batch_size)
            local_times.append(time.perf_counter() - start)
            seconds, served = asyncio.run(triton_run(url, images, args.batch_size))
            triton_times.append(seconds)
        if args.perf_analyzer:
            batch1_s = min(asyncio.run(triton_run(url, images, 1, EVERY_OUTPUT))[0] for _ in range(args.repeats))
            analyzer_ips = perf_analyzer_images_per_s(url, images)
    local_ips, triton_ips = args.images / min(local_times), args.images / min(triton_times)
    difference = float(np.abs(served - expected).max())
    # The server's model processes wait passively (serving/models); this process's torch as launched.
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (spins)")
    print(f"{identity.model} ({identity.pretrained}, {identity.dtype}): {args.images} JPEGs in batches of "
          f"{args.batch_size}, best of {args.repeats}; max |difference| {difference:.2e}; "
          f"in-process OMP_WAIT_POLICY {policy}")
    print_table(["path", "seconds", "images/s", "ratio"], [
        ["in-process embed_images", f"{min(local_times):.3f}", f"{local_ips:.2f}", "1.00"],
        ["Triton coca_image_encoder", f"{min(triton_times):.3f}", f"{triton_ips:.2f}", f"{triton_ips / local_ips:.2f}"],
    ])
    result = {
        "benchmark": "triton-encode", "model": identity.model, "pretrained": identity.pretrained,
        "dtype": identity.dtype, "batch_size": args.batch_size, "images": args.images,
        "in_process_images_per_s": round(local_ips, 2), "triton_images_per_s": round(triton_ips, 2),
        "ratio": round(triton_ips / local_ips, 3), "max_abs_difference": difference, "in_process_omp_wait_policy": policy,
    }
    if args.perf_analyzer:
        client_ips = args.images / batch1_s
        print_table(["batch 1, one request in flight", "images/s"],
                    [["this client (serving.client)", f"{client_ips:.2f}"], ["perf_analyzer", f"{analyzer_ips:.2f}"]])
        result.update(batch1_client_images_per_s=round(client_ips, 2), batch1_perf_analyzer_images_per_s=analyzer_ips)
    print_json(result)
    return 0
