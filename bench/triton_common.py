"""What the Triton benchmarks share: which model to serve, and a server for the run."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import Iterator


def add_server_options(p: argparse.ArgumentParser):
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--pretrained", default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache", default="data/bench/triton", help="exported model repositories, reused across runs")
    p.add_argument("--url", help="use this running Triton (host:port) instead of starting one")
    p.add_argument("--capacity", type=int, help="decoder KV-cache rows (default: the export's)")
    p.add_argument("--queue-delay-us", type=int, help="decoder sequence batcher's max queue delay (default: the export's)")
    p.add_argument("--decoder-precision", default="fp32", choices=["fp32", "int8", "bf16"], help="the decode step's arithmetic")
    add_encoder_options(p)


def add_encoder_options(p: argparse.ArgumentParser):
    from serving.repository import DEFAULT_ENCODER_RUNTIME, ENCODER_RUNTIMES

    p.add_argument("--encoder-runtime", default=DEFAULT_ENCODER_RUNTIME, choices=list(ENCODER_RUNTIMES),
                   help="how Triton's encoders compute (default: what `coca export` writes; onnxruntime: "
                   "the `coca export --format onnx` graphs)")
    p.add_argument("--encoder-precision", default="fp32", choices=["fp32", "int8"], help="with onnxruntime")


def encoder_settings(args):
    from serving.repository import EncoderSettings

    return EncoderSettings(args.encoder_runtime, args.encoder_precision)


def encoder_suffix(args) -> str:
    """Repository folder suffix: repositories of other encoder settings are cached apart."""
    return "" if args.encoder_runtime == "torch" else f"-{args.encoder_runtime}-{args.encoder_precision}"


def repository_dir(args) -> Path:
    captioner = "-captioner" if getattr(args, "decoder_scheduler", "sequence") == "iterative" else ""
    return (Path(args.cache)
            / f"{args.model}-{Path(args.pretrained).name}-seed{args.seed}-{args.dtype}{encoder_suffix(args)}{captioner}")


def exported_repository(args) -> Path:
    """args.model exported (once, cached under --cache) with the decoder settings asked for."""
    from serving.repository import DecoderSettings, configure_decoder, ensure_repository

    repository, _ = ensure_repository(repository_dir(args), args.model, args.pretrained, args.seed, args.dtype,
                                      encoder_settings(args), getattr(args, "decoder_scheduler", "sequence"))
    configure_decoder(repository, DecoderSettings(capacity_rows=args.capacity, queue_delay_us=args.queue_delay_us,
                                                             precision=args.decoder_precision))
    return repository


def served_identity(args, url: str):
    """What the Triton at `url` serves; IdentityMismatchError unless it is args.model / args.pretrained."""
    from serving.client import TritonCoca

    async def ask():
        async with TritonCoca(url) as triton:
            return await triton.check_identity(args.model, args.pretrained)

    return asyncio.run(ask())


@contextlib.contextmanager
def served_repository(args) -> Iterator[tuple[str, object]]:
    """(gRPC url, identity) of a Triton serving args.model: started here on an exported repository, or --url."""
    if args.url:
        yield args.url, served_identity(args, args.url)
        return
    from serving.testing import running_triton

    repository = exported_repository(args)
    with running_triton(repository, timeout=600) as (url, _, server):  # a loaded shared box starts slowly
        print(f"tritonserver pid {server.pid} on {url} ({repository})", flush=True)
        yield url, served_identity(args, url)
