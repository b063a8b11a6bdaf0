"""Small helpers shared by the benchmarks: timing, bandwidth, sample images, output."""
from __future__ import annotations

import json
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


def copy_bandwidth(megabytes: int = 512, repeats: int = 5, device="cpu") -> float:
    """Memory bandwidth now, STREAM-copy style: bytes read + written per second."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = best_of(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * src.element_size() / seconds


def sample_images(count: int) -> list:
    """Real photos shipped with scikit-image, cycled to `count`."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "camera"]
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    return [photos[i % len(photos)] for i in range(count)]


def add_model_options(p, model: str = "coca_ViT-B-32") -> None:
    """--model, --pretrained (default random: the hub is not reachable here) and --seed."""
    p.add_argument("--model", default=model)
    p.add_argument("--pretrained", default="random")
    p.add_argument("--seed", type=int, default=0)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_json(result: dict) -> None:
    print(json.dumps(result), flush=True)
