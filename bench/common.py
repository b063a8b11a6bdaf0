"""Small helpers shared by the benchmarks: timing, bandwidth, sample images, output."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch


def synchronize(device="cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable, repeats: int, device="cpu") -> tuple[float, object]:
    """Fastest wall time of `repeats` calls (the least disturbed by other load) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def sample_images(count: int) -> list:
    """Real photos shipped with scikit-image, cycled to `count`."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "camera"]
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    return [photos[i % len(photos)] for i in range(count)]


def distinct_images(count: int, seed: int = 0, side: int = 512) -> list:
    """`count` different pictures: random crops of the sample photos (a fixed set for a seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for photo in sample_images(count):
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        crop.thumbnail((side, side))
        out.append(crop)
    return out


def add_model_options(p, model: str = "coca_ViT-B-32") -> None:
    """--model, --pretrained (default random: the hub is not reachable here) and --seed."""
    p.add_argument("--model", default=model)
    p.add_argument("--pretrained", default="random")
    p.add_argument("--seed", type=int, default=0)


def machine() -> dict:
    """The CPU and its features (what a figure depends on) and the load it was measured under."""
    from coca.cpu import describe_cpu

    return {"cpu": describe_cpu(), "load_average": round(os.getloadavg()[0], 2)}


def print_table(headers: list[str], rows: list[list]) -> None:
    """The table, under a line naming the machine (CPU features, load average) that gave its figures."""
    now = machine()
    print(f"machine: {now['cpu']}; load average {now['load_average']}")
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def milvus_uri(given, work, stack) -> str:
    """`given` (a running Milvus), else a Milvus standalone of its own under `work`, stopped with `stack`."""
    if given:
        return given
    from search_service.testing import MilvusServerProcess

    server = MilvusServerProcess(work).start()
    stack.callback(server.stop)
    return server.uri


def print_json(result: dict) -> None:
    print(json.dumps({**result, "machine": machine()}), flush=True)
