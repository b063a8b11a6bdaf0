"""Captions through two Triton endpoints vs one: C concurrent captions, side by side in one run.

    coca bench triton-endpoints --model coca-tiny --pretrained random --concurrency 16 --max-tokens 20

Starts two tritonservers on one exported repository (or takes --urls A,B) and runs the same work
through serving.pool.TritonPool([A]) and TritonPool([A, B]), in turns (--rounds each, so both see the
same background load): C clients, each captioning --per-client JPEGs in a row (greedy, exactly
--max-tokens tokens: min_tokens = max_tokens, so every caption costs the same), image encoding
included, as the search service asks for them. Reports captions/s (best round of each), the ratio,
how the pool spread the captions over the endpoints, and whether both gave the same captions.

The floor beside the figure: the cores both servers and this client share. On one machine the two
servers compete for the same cores, so about 1x is what to expect; one machine (or GPU) per endpoint
is what can give up to 2x.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import time
from typing import Iterator

from .common import print_json, print_table, sample_images
from .triton_common import add_server_options, exported_repository, served_identity


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench triton-endpoints", description=__doc__.splitlines()[0])
    add_server_options(p)
    p.add_argument("--urls", help="two running Tritons A,B (same export) instead of starting them")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent captions")
    p.add_argument("--per-client", type=int, default=2, help="captions each client makes in a row")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="runs of each configuration, in turns")
    return p.parse_args(argv)


@contextlib.contextmanager
def two_endpoints(args) -> Iterator[list[str]]:
    if args.urls:
        yield args.urls.split(",")[:2]
        return
    from serving.testing import restartable_tritons

    repository = exported_repository(args)
    with restartable_tritons(repository, count=2, timeout=600) as servers:  # a loaded shared box starts slowly
        print(f"tritonservers pids {[s.pid for s in servers]} on {[s.grpc_url for s in servers]} ({repository})",
              flush=True)
        yield [s.grpc_url for s in servers]


async def measure(urls: list[str], images: list[bytes], concurrency: int, per_client: int, params) -> dict:
    """C clients captioning `per_client` images each through a pool of `urls`, all at once."""
    from serving.pool import TritonPool

    async with TritonPool(urls) as pool:
        await pool.identity()
        for endpoint in pool.endpoints:  # warm-up: a fresh channel to each, the model's first forwards
            await endpoint.run(lambda t: t.caption(images[0], params), counted=False)

        async def client(n: int):
            return [await pool.call(lambda t, i=i: t.caption(images[(n + i) % len(images)], params))
                    for i in range(per_client)]

        start = time.perf_counter()
        captions = [c for batch in await asyncio.gather(*(client(n) for n in range(concurrency))) for c in batch]
        seconds = time.perf_counter() - start
        split = [state.calls for state in pool.states()]
    return {"endpoints": len(urls), "captions": len(captions), "seconds": round(seconds, 3),
            "captions_per_s": round(len(captions) / seconds, 3),
            "tokens_per_s": round(sum(len(c.tokens) for c in captions) / seconds, 1),
            "captions_per_endpoint": split, "tokens": [c.tokens for c in captions]}


def main(argv=None) -> int:
    from coca.settings import SamplingParams

    args = parse(argv)
    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.max_tokens)  # fixed length
    images = []
    for photo in sample_images(6):
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with two_endpoints(args) as urls:
        identity = served_identity(args, urls[0])
        for _ in range(args.rounds):  # in turns: the same background load on both
            for count in (1, 2):
                runs[count].append(asyncio.run(measure(urls[:count], images, args.concurrency, args.per_client, params)))
    best = {count: max(results, key=lambda r: r["captions_per_s"]) for count, results in runs.items()}
    same = best[1]["tokens"] == best[2]["tokens"]
    ratio = best[2]["captions_per_s"] / best[1]["captions_per_s"]
    cores = len(os.sched_getaffinity(0))
    print(f"{identity.model} ({identity.pretrained}, {identity.dtype}): {args.concurrency} concurrent captions, "
          f"{args.per_client} each, greedy {args.max_tokens} tokens, image encoding included; best of {args.rounds}")
    print_table(["endpoints", "captions", "seconds", "captions/s", "tokens/s", "captions per endpoint", "ratio"],
                [[r["endpoints"], r["captions"], r["seconds"], r["captions_per_s"], r["tokens_per_s"],
                  "/".join(map(str, r["captions_per_endpoint"])), f"{r['captions_per_s'] / best[1]['captions_per_s']:.2f}"]
                 for r in (best[1], best[2])])
    print(f"floor: both servers and this client share {cores} cores here, so ~1x is expected; "
          f"same captions through one and two endpoints: {'yes' if same else 'NO'}")
    for r in best.values():
        del r["tokens"]
    print_json({"benchmark": "triton-endpoints", "model": identity.model, "pretrained": identity.pretrained,
                "dtype": identity.dtype, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                "one_endpoint": best[1], "two_endpoints": best[2], "ratio": round(ratio, 3),
                "same_captions": same, "cores": cores,
                "rounds": {str(k): [r["captions_per_s"] for r in v] for k, v in runs.items()}})
    return 0 if same else 1
