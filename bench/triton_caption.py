"""Caption throughput through Triton: C concurrent captions, by each decoder scheduler.

    coca bench triton-caption --model coca_ViT-B-32 --pretrained random --concurrency 1,16 --max-tokens 20 \
        --scheduler sequence,iterative

Exports the model once (cached under --cache; with coca_captioner when --scheduler has iterative),
starts tritonserver, and for each scheduler and concurrency C runs C clients that each caption
--rounds images in a row (greedy, exactly --max-tokens tokens: min_tokens = max_tokens, so every
caption costs the same). sequence: each caption is a coca_text_decoder sequence stepped by the
client; iterative: one streamed request to coca_captioner, whose scheduler steps every live caption
in each forward. Reports captions/s, tokens/s, the mean rows per batched forward (from BATCH_ROWS)
and speedup_16 = captions/s at C=16 over C=1 of the same scheduler; schedulers alternate per
concurrency so that the box's load hits both alike. Client and server share this machine's cores.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import time

from .common import machine, print_json, print_table, sample_images
from .triton_common import add_server_options, served_repository


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench triton-caption", description=__doc__.splitlines()[0])
    add_server_options(p)
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated numbers of concurrent captions")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="captions per client at each concurrency")
    p.add_argument("--scheduler", default="sequence,iterative",
                   help="comma-separated decoder schedulers to compare: sequence (coca_text_decoder's step "
                        "protocol), iterative (coca_captioner)")
    args = p.parse_args(argv)
    args.schedulers = [s.strip() for s in args.scheduler.split(",")]
    unknown = set(args.schedulers) - {"sequence", "iterative"}
    if unknown:
        p.error(f"unknown scheduler(s) {', '.join(sorted(unknown))}: use sequence, iterative")
    args.decoder_scheduler = "iterative" if "iterative" in args.schedulers else "sequence"
    return args


async def measure(url: str, scheduler: str, concurrency: int, rounds: int, embeddings, params) -> dict:
    """C clients captioning `rounds` images each, all at once."""
    from serving.client import TritonCoca

    statistics = captioner_statistics if scheduler == "iterative" else decoder_statistics
    async with TritonCoca(url, scheduler=scheduler) as triton:
        async def client():
            return [await triton.generate(embeddings, params) for _ in range(rounds)]

        await triton.generate(embeddings, params)  # warm-up: a fresh channel, the model's first forward
        before = await statistics(triton)
        start = time.perf_counter()
        generations = [g for batch in await asyncio.gather(*(client() for _ in range(concurrency))) for g in batch]
        seconds = time.perf_counter() - start
        after = await statistics(triton)
    rows = [r for g in generations for r in g.batch_rows if r]
    tokens = sum(len(g.tokens) for g in generations)
    return {
        "scheduler": scheduler, "concurrency": concurrency, "captions": len(generations), "seconds": round(seconds, 3),
        "captions_per_s": round(len(generations) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "mean_rows_per_forward": round(sum(rows) / len(rows), 2), "max_rows_per_forward": max(rows),
        # per forward: Triton's time in the decoder's execute() (forward + Python glue), or the
        # captioner's scheduler round (start, forward, responses)
        "executes": after["executes"] - before["executes"],
        "execute_ms": round((after["compute_ns"] - before["compute_ns"]) / max(1, after["executes"] - before["executes"]) / 1e6, 1),
    }


async def decoder_statistics(triton) -> dict:
    from serving.protocol import TEXT_DECODER

    stats = (await triton.client.get_inference_statistics(TEXT_DECODER, as_json=True))["model_stats"][0]
    per_batch_size = [b["compute_infer"] for b in stats.get("batch_stats", [])]  # one entry per execute()
    return {"executes": sum(int(c["count"]) for c in per_batch_size), "compute_ns": sum(int(c["ns"]) for c in per_batch_size)}


async def captioner_statistics(triton) -> dict:
    stats = await triton.captioner_stats()
    return {"executes": stats["forwards"], "compute_ns": stats["round_us"] * 1000}


def batching_bound(args) -> dict:
    """What batching can give on this CPU, in process (the server's torch threads): a decode step at 1 and
    16 rows, each the median of 3 interleaved measurements (this box's timings swing by a third between
    runs); and the same with each caption's start (its image's cross-attention keys and values, once per
    caption) spread over its tokens: what the iterative scheduler, which pays both, can reach."""
    import statistics

    import torch

    import coca
    from coca.precision import start_seconds, step_seconds
    from coca.quant import quantize

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the decoder model's torch_threads
    net = quantize(coca.load(args.model, pretrained=args.pretrained, seed=args.seed).net, args.decoder_precision)
    steps, starts = {1: [], 16: []}, {1: [], 16: []}
    for _ in range(3):
        for rows in steps:
            steps[rows].append(step_seconds(net, rows))
            starts[rows].append(start_seconds(net, rows))
    torch.set_num_threads(threads)
    step, start = ({rows: statistics.median(v) for rows, v in d.items()} for d in (steps, starts))
    with_starts = {rows: step[rows] + start[rows] / args.max_tokens for rows in step}
    return {"step1_ms": round(step[1] * 1e3, 1), "step16_ms": round(step[16] * 1e3, 1),
            "speedup_16_bound": round(16 * step[1] / step[16], 2),
            "start1_ms": round(start[1] * 1e3, 1), "start16_ms": round(start[16] * 1e3, 1),
            "speedup_16_bound_with_starts": round(16 * with_starts[1] / with_starts[16], 2)}


def main(argv=None) -> int:
    from coca.sampling import SamplingParams

    args = parse(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.max_tokens)  # fixed length
    photo = io.BytesIO()
    sample_images(1)[0].save(photo, format="JPEG")
    with served_repository(args) as (url, identity):
        async def embed():
            from serving.client import TritonCoca

            async with TritonCoca(url) as triton:
                return (await triton.image_embeddings([photo.getvalue()]))[0]

        embeddings = asyncio.run(embed())
        results = [asyncio.run(measure(url, s, c, args.rounds, embeddings, params)) for c in levels for s in args.schedulers]
    bound = batching_bound(args)
    for scheduler in args.schedulers:
        mine = [r for r in results if r["scheduler"] == scheduler]
        base = mine[0]["captions_per_s"] if levels[0] == 1 else None
        for r in mine:
            r["speedup"] = round(r["captions_per_s"] / base, 2) if base else None
            if r["concurrency"] == 16 and base:
                r["vs_bound"] = round(r["speedup"] / bound["speedup_16_bound"], 2)
    print(f"{identity.model} ({identity.pretrained}, {identity.dtype}) through Triton, greedy, "
          f"{args.max_tokens} tokens per caption, {args.rounds} captions per client")
    print_table(["scheduler", "concurrency", "captions", "seconds", "captions/s", "tokens/s", "rows/forward", "max rows",
                 "execute ms", "speedup", "vs bound"],
                [[r["scheduler"], r["concurrency"], r["captions"], r["seconds"], r["captions_per_s"], r["tokens_per_s"],
                  r["mean_rows_per_forward"], r["max_rows_per_forward"], r["execute_ms"], r["speedup"], r.get("vs_bound", "")]
                 for r in results])
    print(f"bound (in process, same precision): a 16-row decode step costs {bound['step16_ms']} ms vs "
          f"{bound['step1_ms']} ms for 1 row, so full batches give at most speedup_16 = {bound['speedup_16_bound']}x; "
          f"targets: rows/forward >= 14, speedup_16 >= 6x fp32, >= 8x int8, speedup_16 >= 0.9x the bound")
    print(f"each caption's start (its image's cross-attention keys and values) costs {bound['start16_ms']} ms for "
          f"16 vs {bound['start1_ms']} ms for 1; spread over {args.max_tokens} tokens, the bound with starts is "
          f"{bound['speedup_16_bound_with_starts']}x")
    at_16 = {r["scheduler"]: r for r in results if r["concurrency"] == 16}
    if len(at_16) == 2:
        new, old = at_16["iterative"], at_16["sequence"]
        print(f"at 16: iterative / sequence = {new['captions_per_s'] / old['captions_per_s']:.2f}x captions/s, "
              f"{new['mean_rows_per_forward']} vs {old['mean_rows_per_forward']} rows per forward")
    print_json({
        "benchmark": "triton-caption", "model": identity.model, "pretrained": identity.pretrained,
        "dtype": identity.dtype, "max_tokens": args.max_tokens, "results": results,
        "speedup_16": {s: r["speedup"] for s, r in at_16.items()},
        "decoder_precision": args.decoder_precision, "bound": bound, "machine": machine(),
    })
    return 0
