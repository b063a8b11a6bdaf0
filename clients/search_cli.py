"""The search commands of `coca`: serve, index, search (registered in clients/cli.py).

    coca serve [--data DIR] [--model NAME --pretrained TAG|PATH|random] [--port 50051]
    coca index DIR [--server 127.0.0.1:50051] [--meta key=value ...] [--captions]
                   [--near-duplicates 0.95 [--skip-near-duplicates]]
    coca index SOURCE [SOURCE ...] --ray [ADDRESS] [--triton HOST:PORT,...] [--writers N] [--report FILE]
    coca search "a red car" [-k 10] [--captions] [--html out.html]
    coca search --image photo.jpg
    coca search "a red barn" --mode hybrid --where year>=2000 --order-by=-added_at
    coca list [--where CONDITION ...] [--order-by=-added_at] [--page-size 20] [--page-token TOKEN]
    coca duplicates [--threshold 0.95] [--page-size 20] [--page-token TOKEN]
    coca caption photo.jpg --server 127.0.0.1:50051 [--stream]   (clients/cli.py's caption command)
    coca backup --out DIR --server HOST:PORT     (while serving: DIR on the service's machine, under its --backup-root)
    coca backup --out DIR --data DATA            (offline: a data directory no service has open)
    coca backup --out DIR --data DATA --collection NAME [--milvus-uri URI]   (a Milvus collection, no service needed)
    coca backup --verify DIR
    coca restore DIR --data NEW
    coca restore DIR --data NEW --collection NAME [--milvus-uri URI]   (a Milvus collection's backup)
    coca reindex --server HOST:PORT --to-model NAME --to-pretrained TAG|FILE --triton HOST:PORT[,...]
    coca reindex --server HOST:PORT --resume | --rollback | --drop-old
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import html
import io
import os
import sys
import time
from pathlib import Path

from coca.errors import InvalidInputError

DEFAULT_SERVER = "127.0.0.1:50051"


# ---------------------------------------------------------------- shared options
def add_connection_options(p: argparse.ArgumentParser, server_help: str = "") -> None:
    """--server (default DEFAULT_SERVER; none when `server_help` says what giving it means) and its credentials."""
    p.add_argument("--server", default=None if server_help else DEFAULT_SERVER,
                   help=server_help or "search service HOST:PORT (default %(default)s)")
    p.add_argument("--token-file", help="bearer token file (or set COCA_SEARCH_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS server")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="deadline of each call in seconds, retries included (default %(default)s)")


def connect(args):
    """A clients.coca_client.Client for the connection options (retries UNAVAILABLE with backoff)."""
    from clients.coca_client import Client

    token = os.environ.get("COCA_SEARCH_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return Client(args.server, token=token, tls_ca=args.tls_ca, timeout=args.timeout)


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"{what} {pair!r}: write it as key=value")
        out[key] = value
    return out


def rpc_error_message(exc) -> str:
    return f"{exc.code().name}: {exc.details()}"


# ---------------------------------------------------------------- serve
def configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/search", help="data directory (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="search service port on 127.0.0.1 (0: a free one; "
                   "the ready line says which)")
    p.add_argument("--triton-port", type=int, default=None, help="Triton gRPC port (default: a free one)")
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="allow server-side paths under DIR in AddImages (repeatable)")
    p.add_argument("--web", type=int, default=None, metavar="PORT",
                   help="also serve the web gallery on http://127.0.0.1:PORT/ (clients/web; 0: a free one, "
                        "printed as 'web gallery on URL')")
    from search_service import add_backup_argument, add_operator_arguments, add_store_arguments

    add_backup_argument(p)
    add_store_arguments(p)
    add_operator_arguments(p)
    from serving.protocol import DECODER_SCHEDULERS
    from serving.repository import DEFAULT_DECODER_SCHEDULER, DEFAULT_ENCODER_RUNTIME

    p.add_argument("--encoders", choices=["torch", "onnxruntime", "onnxruntime-int8"], default=DEFAULT_ENCODER_RUNTIME,
                   help="how Triton's encoders compute: their ONNX graphs in ONNX Runtime (the default; equal to "
                        "torch within 1e-5, faster on CPU), torch, or the ONNX graphs with 8-bit weights (opt-in; "
                        "agreement in README)")
    p.add_argument("--decoder-scheduler", choices=DECODER_SCHEDULERS, default=DEFAULT_DECODER_SCHEDULER,
                   help="captions by coca_captioner (iterative, the default: every live caption in each forward) or "
                        "by the step protocol alone (sequence: Triton's sequence batcher)")


def serve(args) -> int:
    import asyncio

    from search_service import ServiceConfig, operator_settings, run, store_settings
    from serving.launcher import TritonServer
    from serving.repository import ensure_repository

    data = Path(args.data)
    from serving.repository import EncoderSettings

    runtime, _, precision = args.encoders.partition("-")
    repository, logit_scale = ensure_repository(data / "model_repository", args.model, args.pretrained,
                                                args.seed, args.dtype, EncoderSettings(runtime, precision or "fp32"),
                                                args.decoder_scheduler)
    triton = TritonServer(repository, grpc_port=args.triton_port, echo=False, kill_on_parent_exit=True,
                          log_file=data / "triton.log")
    print(f"starting tritonserver on {repository} (log: {data / 'triton.log'}) ...", flush=True)
    triton.start()
    try:
        print(f"tritonserver ready on {triton.grpc_url}", flush=True)
        config = ServiceConfig(data_dir=data, triton_url=triton.grpc_url, port=args.port,
                               allowed_roots=[Path(r) for r in args.root],
                               backup_root=args.backup_root, **store_settings(args),
                               **operator_settings(args), logit_scale=logit_scale)
        galleries = []
        on_serving = (lambda running: galleries.append(_start_web(args.web, running.address))) \
            if args.web is not None else None
        try:
            asyncio.run(run(config, on_serving=on_serving))
        finally:
            for gallery in galleries:
                gallery.stop()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping tritonserver ...", flush=True)
        triton.stop()
    return 0


def _start_web(port: int, service_address: str):
    """The web gallery (clients/web) in a thread, talking to this service over gRPC like any client."""
    from clients.coca_client import Client
    from clients.web.server import start_gallery

    gallery = start_gallery(port, Client(service_address, timeout=300))
    print(f"web gallery on {gallery.url}", flush=True)
    return gallery


# ---------------------------------------------------------------- index
def configure_index(p: argparse.ArgumentParser) -> None:
    from clients.ray_ingest import cli as ray_cli

    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folder of images and videos (searched recursively; "
                   "videos are indexed as scenes: README \"Video\"); with "
                   "--ray also a glob, a text file of paths/URIs, or a Parquet/CSV manifest, several in one run "
                   "(clients/ray_ingest/sources.py)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata for every image")
    p.add_argument("--server-paths", action="store_true",
                   help="send paths instead of bytes (the folder must be under one of the server's --root)")
    p.add_argument("--captions", action="store_true",
                   help="caption each new image as it is added (a caption that fails does not fail the add)")
    p.add_argument("--near-duplicates", type=float, metavar="THRESHOLD",
                   help="report images whose cosine similarity to a stored one is at least THRESHOLD (0 < T <= 1)")
    p.add_argument("--skip-near-duplicates", action="store_true", help="with --near-duplicates: do not store them")
    p.add_argument("--every", type=float, metavar="SECONDS", help="videos: sample a frame this often (default 0.5)")
    p.add_argument("--scene-threshold", type=float, metavar="COSINE",
                   help="videos: cut where consecutive frames' cosine similarity is below this (default 0.85)")
    add_connection_options(p)
    ray_cli.configure(p)


def index(args) -> int:
    from tqdm import tqdm

    from clients.coca_client import Outcome, SearchError
    from clients.ray_ingest import cli as ray_cli
    from coca.media import image_files, video_files

    metadata = parse_pairs(args.meta, "--meta")
    options = add_options(args)
    if args.ray is not None:
        if args.server_paths or any(options.values()):
            raise InvalidInputError("--server-paths, --captions and --near-duplicates do not apply with --ray "
                                    "(Ray workers read and embed the files)")
        status = ray_cli.run(args, metadata)  # the images, on Ray
        videos = [v for source in args.sources if Path(source).is_dir() for v in video_files(source)]
        return max(status, index_videos(args, videos, metadata)) if videos else status  # then the folders' videos
    ray_cli.check_plain(args)
    if len(args.sources) > 1:
        raise InvalidInputError("give one folder (several SOURCEs only with --ray)")
    files = image_files(args.sources[0])
    videos = video_files(args.sources[0])
    if not files and videos:
        return index_videos(args, videos, metadata)
    counts = {outcome.value: 0 for outcome in Outcome}
    with connect(args) as client, tqdm(total=len(files), unit="img", desc="indexing") as bar:
        try:
            for result in client.add_files(files, metadata, server_paths=args.server_paths, **options):
                counts[result.outcome.value] += 1
                if result.outcome is Outcome.FAILED:
                    bar.write(f"{files[result.index]}: {result.error.message}", file=sys.stderr)
                elif result.outcome is Outcome.NEAR_DUPLICATE:
                    other, score = result.near_duplicate
                    bar.write(f"{files[result.index]}: near-duplicate of {other} (cosine {score:.4f})"
                              + (f", stored as {result.id}" if result.id else ", not stored"))
                bar.update(1)
                bar.set_postfix(counts)
        except SearchError as exc:
            bar.close()
            print(f"coca index: error: {exc} (run it again to resume: indexed images "
                  f"are skipped by content hash)", file=sys.stderr)
            return 1
    near = f", {counts['near_duplicate']} near-duplicates" if options["near_duplicate_threshold"] else ""
    print(f"{len(files)} files: {counts['added']} added, {counts['duplicate']} already indexed{near}, "
          f"{counts['failed']} failed")
    failed = index_videos(args, videos, metadata) if videos else 0
    return 1 if counts["failed"] or failed else 0


def index_videos(args, videos: list[Path], metadata: dict[str, str]) -> int:
    """The videos of `coca index DIR`, one at a time, progress in video seconds; 1 if any failed."""
    from tqdm import tqdm

    from clients.coca_client import Outcome, SearchError, video_options
    from coca.media import video_seconds

    options = video_options(every_s=args.every, scene_threshold=args.scene_threshold, caption=args.captions)
    counts = {outcome.value: 0 for outcome in Outcome}
    scenes = 0
    total = sum(video_seconds(v) for v in videos)
    with connect(args) as client, tqdm(total=round(total, 1), unit="video s", desc="videos") as bar:
        try:
            for result in client.add_videos(videos, metadata, server_paths=args.server_paths, options=options):
                counts[result.outcome.value] += 1
                if result.outcome is Outcome.FAILED:
                    bar.write(f"{videos[result.index]}: {result.error.message}", file=sys.stderr)
                else:
                    scenes += len(result.video.scenes)
                bar.update(round(video_seconds(videos[result.index]), 1))
                bar.set_postfix(counts)
        except SearchError as exc:
            bar.close()
            print(f"coca index: error: {exc} (run it again to resume: indexed videos are skipped by content hash)",
                  file=sys.stderr)
            return 1
    print(f"{len(videos)} videos: {counts['added']} added, {counts['duplicate']} already indexed, "
          f"{counts['failed']} failed; {scenes} scenes")
    return 1 if counts["failed"] else 0


def add_options(args) -> dict:
    """add_files' per-item options from `coca index`'s flags (bad values: InvalidInputError, exit 2)."""
    threshold = args.near_duplicates
    if threshold is not None and not 0 < threshold <= 1:
        raise InvalidInputError(f"--near-duplicates {threshold}: a cosine similarity in (0, 1]")
    if args.skip_near_duplicates and threshold is None:
        raise InvalidInputError("--skip-near-duplicates needs --near-duplicates THRESHOLD")
    return {"near_duplicate_threshold": threshold, "skip_near_duplicates": args.skip_near_duplicates,
            "caption": args.captions}


# ---------------------------------------------------------------- caption (coca caption --server)
def caption_through_service(args, params) -> int:
    """`coca caption FILE... --server HOST:PORT [--id ID ...]`: each caption from the search service, one
    "name<TAB>caption" line each; with --stream (the default when stdout is a terminal) the words are
    printed as the decoder writes them (CaptionStream), the same line in the end."""
    from clients.coca_client import InvalidArgument, NotFound, Sampling, SearchError
    from coca import media

    stream = sys.stdout.isatty() if args.stream is None else args.stream
    sampling = Sampling(**{k: v for k, v in dataclasses.asdict(params).items() if v is not None})
    requests = [(path, {"video" if media.is_video(path) else "image": Path(path), "frames": args.frames})
                for path in args.files] + [(item_id, {"id": item_id}) for item_id in args.id]
    if not requests:
        raise InvalidInputError("give image or video files, or --id ID of indexed items")
    with connect(args) as client:
        for name, what in requests:
            try:
                if stream:
                    _print_streamed(name, client.caption_stream(sampling=sampling, **what))
                else:
                    print(f"{name}\t{client.caption(sampling=sampling, **what).text}")
            except SearchError as exc:
                print(f"coca caption: error: {name}: {exc}", file=sys.stderr)
                return 2 if isinstance(exc, (InvalidArgument, NotFound)) else 1
    return 0


def _print_streamed(name: str, chunks) -> None:
    print(f"{name}\t", end="", flush=True)
    try:
        for chunk in chunks:
            print(chunk.piece, end="", flush=True)
    finally:
        print(flush=True)


# ---------------------------------------------------------------- search
def configure_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="what to look for")
    p.add_argument("--image", help="search with an image file instead of text")
    p.add_argument("-k", type=int, default=10, help="number of hits (default %(default)s)")
    p.add_argument("--captions", action="store_true", help="caption the hits (stored for next time)")
    p.add_argument("--min-score", type=float, default=None, help="drop hits below this cosine similarity")
    add_condition_options(p, "hits")
    p.add_argument("--mode", choices=["vector", "keyword", "hybrid"], default="vector",
                   help="text search: by embedding, by caption words (BM25), or both fused (default %(default)s)")
    p.add_argument("--keyword-weight", type=float, default=None, help="--mode hybrid: the keyword list's weight 0..1")
    p.add_argument("--page-token", default="", help="the next_page_token printed by the previous page")
    p.add_argument("--html", help="also write an HTML page of thumbnails, scores and captions")
    add_connection_options(p)


def add_condition_options(p: argparse.ArgumentParser, what: str) -> None:
    """--filter, --where and --order-by (coca search, coca list)."""
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="metadata must match")
    p.add_argument("--where", action="append", default=[], metavar="CONDITION",
                   help="a condition (AND): FIELD=V, FIELD!=V, FIELD=A|B (any of), FIELD>=V, FIELD>V, FIELD<=V, "
                        "FIELD<V (added_at or a declared number/date field; dates in ISO 8601)")
    p.add_argument("--order-by", default="", metavar="FIELD",
                   help=f"{what} in this field's order (--order-by=-FIELD: descending)")


def conditions(args) -> dict:
    """The client's filters/where/order_by keywords from add_condition_options' flags."""
    return dict(filters=parse_pairs(args.filter, "--filter"), where=[parse_condition(c) for c in args.where],
                order_by=args.order_by)


def call_service(args, command: str, body) -> int:
    """body(client) with the connection options; a service error is one line: exit 2 for bad input, else 1."""
    from clients.coca_client import InvalidArgument, NotFound, SearchError

    with connect(args) as client:
        try:
            return body(client) or 0
        except SearchError as exc:
            print(f"coca {command}: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, (InvalidArgument, NotFound)) else 1


def parse_condition(text: str):
    """A --where condition as a client Condition (see the option's help); InvalidInputError when it is none."""
    from clients.coca_client import Condition

    try:
        return Condition.parse(text)
    except ValueError as exc:
        raise InvalidInputError(f"--where {exc}") from None


def search(args) -> int:
    if (args.text is None) == (args.image is None):
        raise InvalidInputError("give either a text or --image FILE")
    if args.image and args.mode != "vector":
        raise InvalidInputError("--mode keyword/hybrid search with a text, not --image")
    query = dict(k=args.k, with_captions=args.captions, min_score=args.min_score, page_token=args.page_token,
                 **conditions(args))

    def body(client):
        if args.image:
            response = client.search_image(Path(args.image), **query)
        else:
            response = client.search_text(args.text, mode=args.mode, keyword_weight=args.keyword_weight, **query)
        print_hits(response.hits)
        print_next_page(response.next_page_token)
        if args.html:
            write_html(args.html, args.text or f"image {args.image}", response.hits,
                       [_thumbnail(client, h.id) for h in response.hits])
            print(f"wrote {args.html}")

    return call_service(args, "search", body)


def print_next_page(token: str) -> None:
    if token:
        print(f"next page: --page-token {token}")


# ---------------------------------------------------------------- list, duplicates
def configure_list(p: argparse.ArgumentParser) -> None:
    add_condition_options(p, "items")
    p.add_argument("--page-size", type=int, default=20, help="items a page, 1..1000 (default %(default)s)")
    p.add_argument("--page-token", default="", help="the next_page_token printed by the previous page")
    add_connection_options(p)


def list_items(args) -> int:
    def body(client):
        page = client.list(page_size=args.page_size, page_token=args.page_token, **conditions(args))
        print(f"{len(page.items)} of {page.total} items")
        print(f"{'added (UTC)':<20}  {'id':<32}  uri / caption")
        for item in page.items:
            added = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item.created_at))
            print(f"{added:<20}  {item.id:<32}  {item.uri}" + (f"\n{'':>56}{item.caption}" if item.caption else ""))
        print_next_page(page.next_page_token)

    return call_service(args, "list", body)


def configure_duplicates(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity, (0, 1] (default %(default)s)")
    p.add_argument("--page-size", type=int, default=20, help="groups a page, 1..1000 (default %(default)s)")
    p.add_argument("--neighbors", type=int, default=10,
                   help="candidates per item from the ANN index, 1..100 (default %(default)s)")
    p.add_argument("--page-token", default="", help="the next_page_token printed by the previous page")
    add_connection_options(p)


def duplicates(args) -> int:
    def body(client):
        page = client.find_duplicates(args.threshold, page_size=args.page_size, page_token=args.page_token,
                                      neighbors=args.neighbors)
        print(f"{len(page.groups)} of {page.total_groups} groups at cosine >= {args.threshold}")
        for number, group in enumerate(page.groups, 1):
            print(f"group {number}: {' '.join(group.ids)}")
            for a, b, score in group.pairs:
                print(f"  {score:.4f}  {a}  {b}")
        print_next_page(page.next_page_token)

    return call_service(args, "duplicates", body)


def print_hits(hits) -> None:
    print(f"{'#':>3}  {'score':>6}  {'id':<32}  uri / caption")
    for rank, hit in enumerate(hits, 1):
        if hit.video_id:  # a moment of a video: where, then how close, then what happens there
            name = os.path.basename(hit.uri.removeprefix("file://")) or hit.video_id
            print(f"{rank:>3}  {name} {clock(hit.start_s)}–{clock(hit.end_s)}  {hit.score:.2f}  {hit.caption}".rstrip())
            continue
        caption = hit.caption or (f"(no caption: {hit.caption_error})" if hit.caption_error else "")
        print(f"{rank:>3}  {hit.score:6.3f}  {hit.id:<32}  {hit.uri}" + (f"\n{'':>46}{caption}" if caption else ""))


def clock(seconds: float) -> str:
    """HH:MM:SS of a time in a video (whole seconds, rounded down)."""
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _thumbnail(client, item_id: str, size: int = 256) -> str:
    """A data: URI of a small JPEG of the item (empty when the image cannot be had)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(client.get(item_id, include_image=True).image)).convert("RGB")
    except Exception:
        return ""
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def write_html(path: str | os.PathLike, query: str, hits, thumbnails: list[str]) -> None:
    """A self-contained page (thumbnails inlined): image, score, id, uri and caption of each hit."""
    cards = []
    for rank, (hit, thumb) in enumerate(zip(hits, thumbnails), 1):
        image = f'<img src="{thumb}" alt="{html.escape(hit.id)}">' if thumb else '<div class="missing">no image</div>'
        caption = html.escape(hit.caption or hit.caption_error)
        cards.append(
            f'<figure>{image}<figcaption><b>#{rank}</b> score {hit.score:.3f}<br>'
            f'<span class="caption">{caption}</span><br><small>{html.escape(hit.id)}<br>{html.escape(hit.uri)}</small>'
            f'</figcaption></figure>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coca search: {html.escape(query)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ width: 256px; margin: 0; }}
img {{ max-width: 256px; max-height: 256px; display: block; }}
.caption {{ font-style: italic; }}
small {{ color: #666; word-break: break-all; }}
</style></head>
<body><h1>{html.escape(query)}</h1><p>{len(hits)} hits</p>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    Path(path).write_text(page, encoding="utf-8")


# ---------------------------------------------------------------- backup and restore
def configure_backup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="the backup folder: new, empty, or a previous backup (then only "
                   "new blobs are copied); with --server a folder on the service's machine under its --backup-root")
    p.add_argument("--data", metavar="DATA", help="back up this data directory offline (no service may have it open); "
                   "with --collection: the blob directory of the collection's replicas (their --data)")
    p.add_argument("--verify", metavar="DIR", help="check a backup: every file's sha256, every blob its items name, "
                   "SQLite's integrity_check; exit 2 with the first fault")
    add_connection_options(p, server_help="back up through the service at HOST:PORT while it serves")
    add_milvus_options(p, "a Milvus collection, no service needed (replicas may serve it meanwhile)",
                       "the collection to back up")


def add_milvus_options(p: argparse.ArgumentParser, title: str, collection_help: str) -> None:
    from search_service import MilvusSettings

    milvus = p.add_argument_group(title)
    milvus.add_argument("--collection", metavar="NAME", help=collection_help)
    milvus.add_argument("--milvus-uri", default=MilvusSettings.uri, help="Milvus address (default %(default)s)")
    milvus.add_argument("--milvus-token-file", help="file holding the Milvus token (or set COCA_MILVUS_TOKEN)")


def backup(args) -> int:
    from search_service import backup_data_dir, verify_backup

    if args.verify:
        if args.out or args.data or args.server:
            raise InvalidInputError("--verify DIR takes no --out, --data or --server")
        with _bar("verifying blobs") as progress:
            manifest = verify_backup(Path(args.verify), progress)
        source = (f"sequence {manifest['sequence']}" if "sequence" in manifest
                  else f"Milvus collection {manifest['collection']!r}")
        print(f"{args.verify}: a verified backup of {manifest['items']} items, {manifest['blobs']['count']} blobs, "
              f"{source}, made {manifest['created']}")
        return 0
    if args.collection:
        if not args.out or args.data is None or args.server is not None:
            raise InvalidInputError("--collection NAME takes --out DIR and --data DATA (its blob directory), no --server")
        return _backup_collection(args)
    if not args.out or (args.data is None) == (args.server is None):
        raise InvalidInputError("give --out DIR and one of --server HOST:PORT (while serving) or --data DATA (offline)")
    if args.data is not None:
        with _bar("copying blobs") as progress:
            summary = backup_data_dir(Path(args.data), Path(args.out), progress)
        _print_backup(summary)
        return 0

    def body(client):
        with _bar("copying blobs") as progress:
            for step in client.backup(args.out):
                if step.summary is None:
                    progress(step.phase, step.done, step.total)
        _print_backup(step.summary)

    return call_service(args, "backup", body)


def _backup_collection(args) -> int:
    from search_service import backup_named_collection

    with _bar("copying blobs") as progress:
        summary = backup_named_collection(_milvus_settings(args), Path(args.data), Path(args.out), progress)
    _print_backup(summary)
    return 0


def _milvus_settings(args):
    from search_service import MilvusSettings, milvus_token

    return MilvusSettings(uri=args.milvus_uri, token=milvus_token(args.milvus_token_file), collection=args.collection)


def _print_backup(summary) -> None:
    print(f"backed up {summary.items} items into {summary.out} (sequence {summary.sequence}): {summary.blobs} blobs, "
          f"{summary.blobs_copied} copied now, {summary.bytes_copied / 1e6:.1f} MB written in {summary.seconds:.2f} s")


def configure_restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("backup", metavar="DIR", help="a backup folder (coca backup --out)")
    p.add_argument("--data", metavar="NEW", required=True, help="the new data directory (of a Milvus backup: the "
                   "new collection's blob directory): absent or empty")
    add_milvus_options(p, "a Milvus collection's backup: restored into a new collection",
                       "the new collection (absent, or present and empty)")


def restore(args) -> int:
    from search_service import restore_backup

    if args.collection:
        return _restore_collection(args)
    with _bar("restoring blobs") as progress:
        manifest = restore_backup(Path(args.backup), Path(args.data), progress)
    print(f"restored {manifest['items']} items (sequence {manifest['sequence']}, model {manifest['model']['model']}) "
          f"into {args.data}; serve it with: coca serve --data {args.data}")
    return 0


def _restore_collection(args) -> int:
    from search_service import restore_collection

    with _bar("restoring items") as progress:
        manifest = restore_collection(Path(args.backup), Path(args.data), _milvus_settings(args), progress)
    print(f"restored {manifest['items']} items (model {manifest['model']['model']}) into the Milvus collection "
          f"{args.collection!r}, their blobs into {args.data}; serve it with: coca serve --vector-store milvus "
          f"--milvus-uri {args.milvus_uri} --collection {args.collection} --milvus-index "
          f"{manifest['index']['index_type']} --data {args.data}")
    return 0


# ---------------------------------------------------------------- reindex
def configure_reindex(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to-model", metavar="NAME", help="the new model (as its Triton export names it)")
    p.add_argument("--to-pretrained", metavar="TAG|FILE", help="its weights: the pretrained tag or the file it was "
                   "exported from (as its Triton export names them)")
    p.add_argument("--triton", metavar="HOST:PORT,...", help="the Triton endpoints serving the new model (with "
                   "--rollback: in place of those recorded for the old generation)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--resume", action="store_true", help="go on with the reindex a stopped service was building, "
                      "or listen to the running one's progress")
    what.add_argument("--rollback", action="store_true", help="switch back to the old generation (kept until "
                      "--drop-old)")
    what.add_argument("--drop-old", action="store_true", help="forget the old generation (no rollback after this)")
    add_connection_options(p, server_help="the search service HOST:PORT")


def reindex(args) -> int:
    from clients.coca_client import FailedPrecondition, InvalidArgument, NotFound, SearchError, Unavailable

    action = "resume" if args.resume else "rollback" if args.rollback else "drop_old" if args.drop_old else "start"
    if not args.server:
        raise InvalidInputError("give --server HOST:PORT: the service whose store is reindexed")
    if action == "start" and not (args.to_model and args.to_pretrained and args.triton):
        raise InvalidInputError("give --to-model NAME --to-pretrained TAG|FILE --triton HOST:PORT[,...] (or --resume, "
                                "--rollback, --drop-old)")
    if action in ("resume", "drop_old") and (args.to_model or args.to_pretrained or args.triton):
        raise InvalidInputError(f"--{action.replace('_', '-')} takes no --to-model, --to-pretrained or --triton")
    with connect(args) as client:
        try:
            last = _follow_reindex(client.reindex(action, to_model=args.to_model or "",
                                                  to_pretrained=args.to_pretrained or "", triton=args.triton or ""))
        except SearchError as exc:  # refused: bad input, a Triton that is not there or serves other weights
            print(f"coca reindex: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, (InvalidArgument, NotFound, FailedPrecondition, Unavailable)) else 1
    print(f"searches answer from {last.answered_by}" if action != "drop_old" else "old generation dropped")
    return 0


def _follow_reindex(steps):
    """Draw the progress of a reindex stream; its last message."""
    from tqdm import tqdm

    last = None
    with tqdm(unit="item", desc="re-embedding", file=sys.stderr, disable=None) as bar:
        for last in steps:
            if last.phase != "done":
                bar.total = last.total
                bar.set_postfix_str(f"{last.rate:.1f} items/s, ETA {last.eta_seconds:.0f} s, {last.phase}")
                bar.update(last.done - bar.n)
    return last


@contextlib.contextmanager
def _bar(description: str):
    """A progress(phase, done, total) callback drawing one tqdm bar (made at the first call: none for no work)."""
    from tqdm import tqdm

    bars = []

    def progress(phase: str, done: int, total: int) -> None:
        if not bars:
            # disable=None: no bar off a terminal (logs, tests)
            bars.append(tqdm(total=total, unit="file", desc=description, file=sys.stderr, disable=None))
        bars[0].update(done - bars[0].n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()
