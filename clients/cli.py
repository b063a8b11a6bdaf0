"""`coca`: the command line. One small function per command.

Errors the user can fix print one line and exit 2; nothing prints a traceback
for bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

from coca.errors import CocaError, InvalidInputError
from coca.prompts import DEFAULT_TEMPLATE
from coca.settings import SamplingParams

COMMANDS: dict[str, Callable] = {}


def command(name: str, help: str):
    """Register `fn(args)` as a subcommand; `fn.configure(parser)` adds its arguments."""

    def register(fn):
        fn.cli_help = help
        COMMANDS[name] = fn
        return fn

    return register


def add_model_options(p: argparse.ArgumentParser):
    p.add_argument("--model", default="coca_ViT-B-32", help="open_clip CoCa name (coca_ViT-B-32, coca_ViT-L-14, coca-tiny)")
    p.add_argument("--pretrained", default="laion2b_s13b_b90k",
                   help="open_clip tag, a local checkpoint file, or 'random'")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of sampling")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


# SamplingParams field -> its CLI option (seed: the model options' --seed, used when temperature > 0)
SAMPLING_OPTIONS = {
    "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "num_beams": "--beams",
    "num_beam_groups": "--beam-groups", "repetition_penalty": "--repetition-penalty",
    "min_tokens": "--min-tokens", "max_tokens": "--max-tokens", "seed": "--seed",
}
SAMPLING_HELP = {"temperature": "0 = greedy"}


def add_sampling_options(p: argparse.ArgumentParser):
    """One option per SamplingParams field, its default and type the field's."""
    defaults = SamplingParams()
    for field in fields(SamplingParams):
        if field.name != "seed":
            default = getattr(defaults, field.name)
            p.add_argument(SAMPLING_OPTIONS[field.name], dest=field.name, type=type(default), default=default,
                           help=SAMPLING_HELP.get(field.name, f"default {default}"))
    p.add_argument("--frames", type=int, default=16, help="frames sampled from a video")


def sampling_params(args):
    values = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if f.name != "seed"}
    return SamplingParams(**values, seed=args.seed if args.temperature > 0 else None)


def load_model(args):
    import coca

    return coca.load(args.model, pretrained=args.pretrained, seed=args.seed, dtype=args.dtype)


# --- commands -----------------------------------------------------------------
@command("caption", "caption images or videos")
def caption(args):
    from coca import media

    params = sampling_params(args)
    if not args.server and (args.id or args.stream):
        raise InvalidInputError("--id and --stream go with --server (the search service)")
    if not args.server and not args.files:
        raise InvalidInputError("give image or video files to caption")
    if args.server:
        from clients.search_cli import caption_through_service

        return caption_through_service(args, params)
    if args.triton:
        from serving.client import caption_files

        for path, text in caption_files(args.triton, args.files, params, frames=args.frames):
            print(f"{path}\t{text}")
        return
    model = load_model(args)
    for path in args.files:
        if media.is_video(path):
            text = model.caption_video(path, frames=args.frames, params=params).text
        else:
            text = model.caption([path], params)[0].text
        print(f"{path}\t{text}")


def _caption_args(p):
    from clients.search_cli import add_connection_options

    p.add_argument("files", nargs="*", metavar="IMAGE|VIDEO")
    p.add_argument("--triton", metavar="HOST:PORT", help="caption through a Triton server (gRPC)")
    add_connection_options(p, server_help="caption through the search service at HOST:PORT (coca serve)")
    p.add_argument("--id", action="append", default=[], help="with --server: caption the indexed item ID (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="with --server: print the words as they are written (default: when stdout is a terminal)")
    add_sampling_options(p)


caption.configure = _caption_args


def _write_embeddings(names, vectors, out):
    import numpy as np

    if out:
        np.save(out, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {out}")
        return
    for name, vector in zip(names, vectors):
        print(json.dumps({"input": name, "embedding": [round(float(v), 6) for v in vector]}))


@command("embed-image", "image ClassEmbeddings (normalised)")
def embed_image(args):
    model = load_model(args)
    _write_embeddings(args.files, model.embed_images(args.files, progress=len(args.files) > 8), args.out)


embed_image.configure = lambda p: (p.add_argument("files", nargs="+", metavar="IMAGE"),
                                   p.add_argument("--out", help="write a .npy file instead of JSON lines"))


@command("embed-text", "text ClassEmbeddings (normalised)")
def embed_text(args):
    model = load_model(args)
    _write_embeddings(args.texts, model.embed_texts(args.texts), args.out)


embed_text.configure = lambda p: (p.add_argument("texts", nargs="+", metavar="TEXT"),
                                  p.add_argument("--out", help="write a .npy file instead of JSON lines"))


@command("rank", "rank texts by cosine distance to an image")
def rank(args):
    model = load_model(args)
    print(f"{'distance':>8}  text")
    for text, distance in model.rank(args.image, args.texts):
        print(f"{distance:8.4f}  {text}")


rank.configure = lambda p: (p.add_argument("image"), p.add_argument("texts", nargs="+", metavar="TEXT"))


@command("classify", "zero-shot classification of an image")
def classify(args):
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    model = load_model(args)
    print(f"{'prob':>7}  label")
    for label, prob in model.classify(args.image, labels, args.template)[: args.top]:
        print(f"{prob:7.2%}  {label}")


classify.configure = lambda p: (
    p.add_argument("image"),
    p.add_argument("--labels", required=True, help="comma-separated class names"),
    p.add_argument("--template", default=DEFAULT_TEMPLATE),
    p.add_argument("--top", type=int, default=10),
)


@command("eval-zero-shot", "zero-shot accuracy on an ImageFolder-style directory (one folder per class)")
def eval_zero_shot(args):
    from clients.zero_shot import evaluate_folder

    report = evaluate_folder(load_model(args), Path(args.directory), args.template, args.batch_size)
    print(report.format())
    if args.json:
        print(json.dumps(report.summary()))


eval_zero_shot.configure = lambda p: (
    p.add_argument("directory"),
    p.add_argument("--template", default=DEFAULT_TEMPLATE),
    p.add_argument("--batch-size", type=int, default=16),
    p.add_argument("--json", action="store_true", help="also print a JSON summary line"),
)


@command("attention", "heat-maps of where the image encoder looks (per head and mean)")
def attention(args):
    from coca import media, plots

    model = load_model(args)
    weights = model.encode_images([args.image], want_attention=True).attention[0]  # (H, 1 + P, 1 + P)
    grid = model.net.visual.grid
    cls_to_patches = weights[:, 0, 1:].reshape(-1, grid, grid).float().numpy()
    out = plots.image_attention_png(media.load_image(args.image), cls_to_patches, args.out)
    print(f"wrote {out}")


attention.configure = lambda p: (p.add_argument("image"), p.add_argument("--out", required=True, help="PNG file"))


@command("attention-text", "which tokens the text encoder's ClassEmbedding attends to")
def attention_text(args):
    from coca import plots

    model = load_model(args)
    enc = model.encode_texts([args.text], want_attention=True)
    tokens = enc.kept_tokens[0].tolist()
    words = slice(1, tokens.index(49407) if 49407 in tokens else len(tokens))  # between SOT and EOT
    layer = enc.attention[args.layer][0]  # (H, n + 1, n + 1); the last query is the CLS
    out = plots.text_attention_png(
        model.token_strings(tokens[words]), layer[:, -1, words].float().numpy(), args.out
    )
    print(f"wrote {out}")


attention_text.configure = lambda p: (
    p.add_argument("text"),
    p.add_argument("--out", required=True, help="PNG file"),
    p.add_argument("--layer", type=int, default=-1, help="which self-attention layer (default: last)"),
)


@command("plot", "feature-space plot (t-SNE) of images with thumbnails, or of texts")
def plot(args):
    from coca import media, plots

    if args.index:  # the running search service's images: no model here
        from clients.plot_index import plot_index

        return plot_index(args)
    model = load_model(args)
    if args.texts:
        points, labels = model.embed_texts(args.texts), args.texts
    else:
        folder = Path(args.directory or ".")
        files = media.image_files(folder)
        if len(files) < 2:
            raise InvalidInputError(f"{folder}: need at least two images to plot")
        points, labels = model.embed_images([str(f) for f in files], progress=True), [media.load_image(f) for f in files]
    print(f"wrote {plots.feature_space_png(points, labels, args.out, method=args.method)}")


plot.configure = lambda p: (
    p.add_argument("directory", nargs="?", help="folder of images"),
    p.add_argument("--texts", nargs="+", metavar="TEXT", help="plot these texts instead"),
    p.add_argument("--out", required=True, help="PNG file"),
    p.add_argument("--method", default="tsne", choices=["tsne", "pca"]),
    _plot_index_options(p),
)


def _plot_index_options(p):
    from clients.plot_index import configure

    configure(p)


@command("info", "net information (parameters per part and array, layer types), this CPU's features; "
                 "--repository: an export's identity and precision")
def info(args):
    from coca.cpu import describe_cpu

    print(f"CPU: {describe_cpu()}")
    if args.repository:
        return print(repository_information(args.repository))
    from coca import netinfo

    model = load_model(args)
    print(netinfo.net_information(model.net, arrays=args.arrays))


def _cpu_features(listed: str) -> frozenset[str]:
    from coca.cpu import FEATURES

    features = frozenset(f for f in listed.split(",") if f)
    if features - set(FEATURES):
        raise InvalidInputError(f"--cpu-features: unknown {', '.join(sorted(features - set(FEATURES)))}; "
                                f"known: {', '.join(FEATURES)}")
    return features


def repository_information(repository: str) -> str:
    """An exported repository's identity and its precision record (every gate figure of an automatic choice)."""
    from coca.precision import summary
    from serving.repository import read_manifest

    manifest = read_manifest(repository)
    record = manifest.get("precision") or {"mode": "fixed", "chosen": {"encoders": "?", "decoder": "?"}}
    lines = [f"{repository}: {manifest['model']} ({manifest['pretrained']}, {manifest['dtype']}), "
             f"id {manifest['repository_id']}", f"precision: {summary(record)}"]
    if record["mode"] == "auto":
        lines.append(f"  chosen on: {record['cpu']} (load average {record['load_average']}), as a CPU with "
                     f"{' '.join(record['features']) or 'no listed features'}; gates {record['gates']}")
        for row in record["candidates"]:
            figures = {k: v for k, v in row.items() if k not in ("encoders", "decoder", "passed", "failed")}
            verdict = "passed" if row["passed"] else "failed " + ", ".join(row["failed"])
            lines.append(f"  encoders {row['encoders']}, decoder {row['decoder']}: {verdict}; {figures}")
        lines += [f"  not tried: {name}: {why}" for name, why in record["skipped"].items()]
    return "\n".join(lines)


info.configure = lambda p: (
    p.add_argument("--arrays", action="store_true", help="list every array"),
    p.add_argument("--repository", help="a folder written by `coca export`: its identity and precision choice"),
)


@command("bench", "benchmarks (see bench/): caption, ...")
def bench(args):
    import subprocess

    # A program of its own (python -m bench): the benchmarks may import any layer, nothing imports them.
    return subprocess.call([sys.executable, "-m", "bench", args.name, *args.rest])


bench.configure = lambda p: (p.add_argument("name"), p.add_argument("rest", nargs=argparse.REMAINDER))
bench.raw = True  # its own argument parser takes the model options


@command("demo", "caption, rank and classify sample photos (pretrained weights when reachable)")
def demo(args):
    from clients.demo import run_demo

    return run_demo(args)


def _demo_options(p):
    from clients.demo import configure

    configure(p)


demo.configure = _demo_options


def search_command(name: str, help: str, function: str, model_options: bool = False) -> None:
    """Register clients/search_cli.py's `function` (and its configure_NAME) as a subcommand, imported when run:
    `coca --help` stays fast. The search commands take no model options (the service holds the model), serve aside."""

    def run(args):
        from clients import search_cli

        return getattr(search_cli, function)(args)

    def configure(p):
        from clients import search_cli

        getattr(search_cli, f"configure_{name}")(p)

    run.configure, run.raw = configure, not model_options
    command(name, help)(run)


search_command("serve", "run tritonserver and the search service on 127.0.0.1 until Ctrl-C", "serve", model_options=True)
search_command("index", "add a folder of images to the search service (resumable)", "index")
search_command("search", "search the indexed images by text or by image", "search")
search_command("list", "browse the indexed items a page at a time (conditions, order)", "list_items")
search_command("backup", "back up the search store (while serving, through the service), or --verify a backup",
               "backup")
search_command("restore", "restore a backup into a new data directory", "restore")
search_command("reindex", "move the search store to another model while it serves (or --rollback, --drop-old)",
               "reindex")
search_command("duplicates", "groups of near-identical indexed images (cosine similarity >= a threshold)", "duplicates")


@command("export", "write a Triton model repository (configs, model.py, each part's weights) for a model")
def export(args):
    from serving.repository import DecoderSettings, EncoderSettings, export_repository

    from serving.repository import auto_precision

    named = bool(args.encoder_precision or args.decoder_precision)
    args.precision = args.precision or ("fixed" if named else "auto")
    if args.precision == "auto" and named:
        raise InvalidInputError("--precision auto chooses the encoder and decoder precisions: drop "
                                "--encoder-precision/--decoder-precision, or use --precision fixed")
    if args.calibration_index < 1:
        raise InvalidInputError(f"--calibration-index must be >= 1, got {args.calibration_index}")
    settings = DecoderSettings(capacity_rows=args.capacity, sequence_idle_s=args.sequence_idle,
                               precision=args.decoder_precision, scheduler=args.decoder_scheduler)
    encoders = EncoderSettings(EXPORT_FORMATS[args.format], args.encoder_precision or "fp32")
    model, record = load_model(args), None
    if args.precision == "auto":
        features = None if args.cpu_features is None else _cpu_features(args.cpu_features)
        encoders, settings, record = auto_precision(model, encoders, settings, args.calibration_index, features)
    manifest = export_repository(model, args.out, decoder=settings, encoders=encoders, precision=record)
    if record is not None:
        print(repository_information(args.out))
    print(f"exported {args.model} ({args.pretrained}, {args.dtype}) to {args.out}; identity: {manifest}")


EXPORT_FORMATS = {"python": "torch", "onnx": "onnxruntime"}  # --format: the encoders' runtime it means


def _export_defaults() -> tuple[str, str]:
    """--format and --decoder-scheduler unless given: serving.repository's defaults (one home)."""
    from serving.repository import DEFAULT_DECODER_SCHEDULER, DEFAULT_ENCODER_RUNTIME

    return ({runtime: name for name, runtime in EXPORT_FORMATS.items()}[DEFAULT_ENCODER_RUNTIME],
            DEFAULT_DECODER_SCHEDULER)


export.configure = lambda p: (
    p.add_argument("--out", required=True, help="model repository folder (model_repository: in place)"),
    p.add_argument("--capacity", type=int, help="decoder KV-cache rows (default 64; a beam search takes --beams)"),
    p.add_argument("--sequence-idle", type=float, metavar="SECONDS",
                   help="Triton drops a silent caption sequence after this (default 30); the decoder frees it soon after"),
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default=_export_defaults()[0],
                   help="onnx (default): also write the encoders as ONNX graphs (1/model.onnx, what NGC Triton's "
                        "onnxruntime backend serves) and run them with ONNX Runtime inside the Python backend; "
                        "python: the encoders in torch"),
    p.add_argument("--precision", choices=["fixed", "auto"],
                   help="auto (the default unless --encoder-precision/--decoder-precision is given): measure each "
                        "precision this CPU runs fast against fp32 on a generated calibration set and keep the "
                        "fastest that passes the gates (README Precision); fixed: those two options (default fp32)"),
    p.add_argument("--calibration-index", type=int, default=100_000, metavar="ITEMS",
                   help="with --precision auto: items of the index the top-10 overlap gate searches (default 100000)"),
    p.add_argument("--cpu-features", metavar="LIST",
                   help="with --precision auto: choose as if the CPU had these features (comma-separated, e.g. "
                        "avx2,fma,avx512f,avx512_vnni; default: this CPU's); the gates are measured here all the same"),
    p.add_argument("--encoder-precision", choices=["fp32", "int8"],
                   help="with --format onnx: int8 = 8-bit weights (MatMulNBits), opt-in, agreement in README"),
    p.add_argument("--decoder-precision", choices=["fp32", "int8", "bf16"],
                   help="the decode step's arithmetic (default fp32; int8, bf16: opt-in, agreement in README)"),
    p.add_argument("--decoder-scheduler", choices=["sequence", "iterative"], default=_export_defaults()[1],
                   help="iterative (default): also export coca_captioner (one streamed request per caption, every "
                        "live caption in each forward), which clients and the service then use for captions; "
                        "sequence: only the step protocol's decoder (Triton's sequence batcher)"),
)


@command("triton", "run tritonserver (CPU, Python backend) on an exported model repository until Ctrl-C")
def triton(args):
    from serving.repository import read_manifest
    from serving.launcher import main as launch

    read_manifest(args.model_repository)  # a repository without weights: say so before starting anything
    return launch(["--model-repository", args.model_repository, "--grpc-port", str(args.grpc_port),
                   "--http-port", str(args.http_port), "--metrics-port", str(args.metrics_port)])


triton.configure = lambda p: (
    p.add_argument("--model-repository", required=True, help="a folder written by `coca export`"),
    p.add_argument("--grpc-port", type=int, default=8001),
    p.add_argument("--http-port", type=int, default=8000),
    p.add_argument("--metrics-port", type=int, default=8002),
)
triton.raw = True  # the repository holds the model

# --- entry point --------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coca", description="CoCa captioning and search")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.cli_help, description=fn.cli_help)
        if not getattr(fn, "raw", False):
            add_model_options(p)
        fn.configure(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # open_clip logs a warning for every random init; users see errors, or more with COCA_LOG_LEVEL=INFO
    logging.basicConfig(level=os.environ.get("COCA_LOG_LEVEL", "ERROR"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except (CocaError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"coca {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
