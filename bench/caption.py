"""Caption speed: our KV-cached decoder vs open_clip `generate`, same weights, same images.

    coca bench caption --model coca_ViT-B-32 --pretrained random --max-tokens 20 --batch 1 [--precision fp32,int8,bf16] [--dtype bfloat16]

Also measures, beside each decode step, its floor: one fp32 matrix-vector product over as
many bytes as the step's weights (the time just to stream them), and reports step / floor.
--precision int8,bf16 add the int8 and bf16 decoders (coca/quant.py), with their greedy captions on a
fixed set of distinct photos compared to fp32's (agreement printed). --dtype bfloat16 adds the whole
net in bfloat16 (layer norms, attention and KV cache too), for comparison.
"""
from __future__ import annotations

import argparse

import torch

import coca
from coca.generate import generate
from coca.precision import step_seconds
from coca.sampling import SamplingParams

from .common import add_model_options, best_of, distinct_images, print_json, print_table, sample_images, synchronize


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench caption", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 also runs float32 and reports agreement")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--precision", default="fp32,int8,bf16",
                   help="comma-separated: fp32, int8, bf16 (coca/quant.py: the step's linears), each vs fp32")
    p.add_argument("--agreement-images", type=int, default=24, help="distinct photos of the fixed agreement set")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p.parse_args(argv)


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


def matvec_bandwidth(nbytes: int, repeats: int = 5, device="cpu") -> float:
    """Bytes per second of one fp32 matrix-vector product over `nbytes` of matrix: the weight-streaming floor."""
    rows = max(1, nbytes // (4 * 512))
    matrix = torch.randn(rows, 512, device=device)
    vector = torch.randn(512, device=device)
    with torch.inference_mode():
        torch.mv(matrix, vector)
        seconds, _ = best_of(lambda: torch.mv(matrix, vector), repeats, device)
    return rows * 512 * 4 / seconds


BYTES_PER_WEIGHT_DIVISOR = {"int8": 4, "bf16": 2}  # of fp32's 4 bytes (int8's scales aside)


def variants(args, reference):
    """(label, model) of every precision to measure, fp32 first."""
    from coca.quant import quantize

    out = [("float32", coca.from_reference(args.model, args.pretrained, reference, device=args.device))]
    if args.dtype == "bfloat16":
        out.append(("bfloat16", coca.from_reference(args.model, args.pretrained, reference, dtype="bfloat16", device=args.device)))
    for label, model in out:
        model.step_bytes = model.net.step_weight_bytes()
    for precision in args.precision.split(","):
        if precision != "fp32":
            model = coca.from_reference(args.model, args.pretrained, reference, device=args.device)
            model.step_bytes = model.net.step_weight_bytes() // BYTES_PER_WEIGHT_DIVISOR[precision]
            out.append((precision, quantize(model.net, precision) and model))
    return out


def caption_tokens(model, pixels, params, batch: int) -> list[list[int]]:
    return [tokens for i in range(0, len(pixels), batch) for tokens in ours(model, pixels[i : i + batch], params)()]


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = coca.create_open_clip(args.model, args.pretrained, args.seed).to(args.device)
    models = variants(args, reference)
    fp32 = models[0][1]
    pixels = fp32.pixels(sample_images(args.batch))
    fixed_set = fp32.pixels(distinct_images(args.agreement_images, args.seed))
    params = SamplingParams(max_tokens=args.max_tokens)  # greedy, the card's default

    ref_s, ref_tokens = best_of(open_clip_generate(reference, pixels, params), max(1, args.repeats - 1), args.device)
    rows, measured = [["open_clip generate", "float32", f"{ref_s:.3f}", "1.00", "", "", "", ""]], {}
    fixed_fp32 = caption_tokens(fp32, fixed_set, params, args.batch)
    for label, model in models:
        ours(model, pixels, params)()  # warm-up (allocator, oneDNN kernels)
        seconds, tokens = best_of(ours(model, pixels, params), args.repeats, args.device)
        step_s = step_seconds(model.net, args.batch)
        floor_bytes = model.step_bytes
        floor_s = floor_bytes / matvec_bandwidth(floor_bytes, device=args.device)  # measured now, beside the step
        fixed = fixed_fp32 if model is fp32 else caption_tokens(model, fixed_set, params, args.batch)
        same = sum(a == b for a, b in zip(fixed, fixed_fp32)) / len(fixed_fp32)
        measured[label] = {
            "seconds": round(seconds, 4), "speedup": round(ref_s / seconds, 2), "step_ms": round(step_s * 1e3, 2),
            "step_weight_gb": round(floor_bytes / 1e9, 3), "floor_ms": round(floor_s * 1e3, 2),
            "step_over_floor": round(step_s / floor_s, 2), "identical_to_open_clip": tokens == ref_tokens,
            "captions_equal_fp32": round(same, 4), "token_agreement_fp32": round(agreement(fixed, fixed_fp32), 4),
        }
        rows.append([f"ours (KV cache)", label, f"{seconds:.3f}", f"{ref_s / seconds:.2f}", f"{step_s * 1e3:.1f}",
                     f"{floor_s * 1e3:.1f}", f"{step_s / floor_s:.2f}", f"{same:.0%}"])
    print(f"{args.model} ({args.pretrained}), batch {args.batch}, {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads; floor: one fp32 matvec over the step's weight bytes, measured "
          f"beside each step; fixed set: {len(fixed_set)} distinct photos, greedy; fp32 identical to open_clip: "
          f"{measured['float32']['identical_to_open_clip']}")
    print_table(["implementation", "precision", "seconds", "speedup", "step ms", "floor ms", "step/floor",
                 "captions = fp32"], rows)
    print_json({
        "benchmark": "caption", "model": args.model, "device": args.device, "batch": args.batch,
        "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "open_clip_s": round(ref_s, 4),
        "agreement_images": len(fixed_set), "targets": {"fp32_step_over_floor": 1.5, "fp32_speedup": 3.5,
                                                        "reduced_speedup": 6, "captions_equal_fp32": 0.95},
        "results": measured,
    })
    return 0
