"""Caption speed: our KV-cached decoder vs open_clip `generate`, same weights, same images.

    coca bench caption --model coca_ViT-B-32 --pretrained random --max-tokens 20 --batch 1 [--dtype bfloat16]

Also measures this machine's copy bandwidth in the same run and reports our
decode step as a multiple of its floor (weight bytes per step / bandwidth).
"""
from __future__ import annotations

import argparse
import time

import torch

import coca
from coca.generate import generate
from coca.sampling import SOT, SamplingParams

from .common import add_model_options, best_of, copy_bandwidth, print_json, print_table, sample_images, synchronize


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench caption", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 also runs float32 and reports agreement")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    return p.parse_args(argv)


def step_seconds(net, batch: int, steps: int = 16) -> float:
    """Mean time of one cached decode step at batch `batch`, over positions 0..steps-1."""
    cache = net.new_cache(batch, steps)
    slots, device = slice(0, batch), net.device
    with torch.inference_mode():
        net.start_sequences(cache, slots, torch.zeros(batch, cache.cross[0].k.shape[2], net.config.decoder.width))
        tokens = torch.full((batch, 1), SOT, device=device)
        net.decode(tokens, torch.zeros(batch, dtype=torch.long, device=device), cache, slots)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for pos in range(1, steps):
            net.decode(tokens, torch.full((batch,), pos, device=device), cache, slots)
        synchronize(device)
    return (time.perf_counter() - start) / (steps - 1)


def ours(model, pixels, params):
    def run():
        with torch.inference_mode():
            embs = model.net.visual(pixels).image_embeddings
            return [g.tokens for g in generate(model.net, embs, params)]

    return run


def open_clip_generate(reference, pixels, params):
    def run():
        with torch.no_grad():
            out = reference.generate(
                pixels, generation_type="top_k", top_k=1, seq_len=params.max_tokens + 1,
                min_seq_len=params.effective_min_tokens + 1,
            )
        return [[t for t in row[1:] if t != 0] for row in out.tolist()]

    return run


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of token positions that agree (captions padded to equal length)."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(n) if i < len(x) and i < len(y) and x[i] == y[i])
        total += n
    return same / max(total, 1)


def main(argv=None) -> int:
    args = parse(argv)
    reference = coca.create_open_clip(args.model, args.pretrained, args.seed).to(args.device)
    model = coca.from_reference(args.model, args.pretrained, reference, device=args.device)
    pixels = model.pixels(sample_images(args.batch))
    params = SamplingParams(max_tokens=args.max_tokens)  # greedy, the card's default

    ours(model, pixels, params)()  # warm-up (allocator, oneDNN kernels)
    ours_s, our_tokens = best_of(ours(model, pixels, params), args.repeats, args.device)
    ref_s, ref_tokens = best_of(open_clip_generate(reference, pixels, params), max(1, args.repeats - 1), args.device)
    bandwidth = copy_bandwidth(device=args.device)
    step_s = step_seconds(model.net, args.batch)
    floor_s = model.net.step_weight_bytes() / bandwidth

    rows = [
        ["open_clip generate", "float32", f"{ref_s:.3f}", "1.00", "", ""],
        ["ours (KV cache)", "float32", f"{ours_s:.3f}", f"{ref_s / ours_s:.2f}", f"{step_s * 1e3:.1f}", f"{step_s / floor_s:.2f}"],
    ]
    result = {
        "benchmark": "caption", "model": args.model, "device": args.device, "batch": args.batch,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "ours_s": round(ours_s, 4), "open_clip_s": round(ref_s, 4), "speedup": round(ref_s / ours_s, 2),
        "identical": our_tokens == ref_tokens,
        "step_ms": round(step_s * 1e3, 2), "step_weight_gb": round(model.net.step_weight_bytes() / 1e9, 3),
        "copy_bandwidth_gbs": round(bandwidth / 1e9, 2), "step_over_floor": round(step_s / floor_s, 2),
    }
    if args.dtype == "bfloat16":
        bf16 = coca.from_reference(args.model, args.pretrained, reference, dtype="bfloat16", device=args.device)
        ours(bf16, pixels, params)()
        bf16_s, bf16_tokens = best_of(ours(bf16, pixels, params), args.repeats, args.device)
        bf16_step = step_seconds(bf16.net, args.batch)
        bf16_floor = bf16.net.step_weight_bytes() / bandwidth
        rows.append(["ours (KV cache)", "bfloat16", f"{bf16_s:.3f}", f"{ref_s / bf16_s:.2f}",
                     f"{bf16_step * 1e3:.1f}", f"{bf16_step / bf16_floor:.2f}"])
        result.update({
            "bf16_s": round(bf16_s, 4), "bf16_speedup": round(ref_s / bf16_s, 2),
            "bf16_step_ms": round(bf16_step * 1e3, 2), "bf16_step_over_floor": round(bf16_step / bf16_floor, 2),
            "bf16_token_agreement": round(agreement(bf16_tokens, our_tokens), 4),
        })
    print(f"{args.model} ({args.pretrained}), batch {args.batch}, {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"identical tokens: {result['identical']}")
    print_table(["implementation", "dtype", "seconds", "speedup", "step ms", "step/floor"], rows)
    print_json(result)
    return 0
