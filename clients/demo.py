"""`coca demo` (what `make demo` runs): the whole system once, on real sample photos.

1. exports the model to a Triton model repository (pretrained weights when reachable; otherwise random
   weights, with a loud banner: the captions are then meaningless, the plumbing is real);
2. starts `coca serve` (tritonserver + the gRPC search service) as a child process;
3. indexes sample photos that scikit-image ships, searches them by text with captions, captions and
   classifies a photo, and plots the index's feature space (t-SNE), all through the Python client;
4. stops everything it started, also on an error or Ctrl-C (and the child dies with it if it is killed).

With --serve it keeps the service and the web gallery running until Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from clients.coca_client import SearchError
from coca.errors import UnknownModelError, WeightsUnavailableError
from search_service import ServiceChild
from serving.supervisor import ProcessError

BANNER = """
########################################################################
#  Pretrained weights are not reachable here: using RANDOM weights.    #
#  Captions and rankings below are meaningless; the plumbing is real.  #
########################################################################
"""

# scikit-image's sample photos (shipped in the wheel, no download). `cat` is `chelsea` again: the service
# stores it once (same content, same id), which the demo shows.
PHOTOS = ["astronaut", "coffee", "chelsea", "cat", "rocket", "camera", "hubble_deep_field", "coins", "moon",
          "clock", "colorwheel", "immunohistochemistry"]
QUERIES = ["a cat", "an astronaut in a space suit", "a cup of coffee"]
LABELS = ["astronaut", "coffee", "cat", "rocket", "coins", "moon", "galaxies", "clock"]
WEB_GALLERY = re.compile(r"^web gallery on (\S+)", re.M)  # what `coca serve --web` prints
ROOT = Path(__file__).resolve().parents[1]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="folder for photos, the service's data and pictures")
    p.add_argument("--query", action="append", default=None, metavar="TEXT",
                   help=f"text queries (repeatable; default: {', '.join(repr(q) for q in QUERIES)})")
    p.add_argument("-k", type=int, default=3, help="hits per query (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="search service port (default: a free one)")
    p.add_argument("--serve", action="store_true",
                   help="afterwards keep the service and the web gallery running until Ctrl-C")
    p.add_argument("--web", type=int, default=0, metavar="PORT", help="web gallery port with --serve (default: a free one)")


def sample_photos(folder: Path, names: list[str] = PHOTOS) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths


def export_model(out: Path, model: str, pretrained: str, seed: int, dtype: str) -> tuple[Path, str]:
    """The data dir of this model and weights, its model repository exported; falls back to random weights."""
    from serving.repository import ensure_repository

    def data_dir(tag: str) -> Path:
        return out / f"search-{model}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(tag).name)}"

    if pretrained != "random" and not Path(pretrained).is_file() and not (data_dir(pretrained) / "model_repository").is_dir():
        print(f"== pretrained weights {pretrained!r}: from the Hugging Face hub or its local cache", flush=True)
        _offline_unless_hub_reachable()
    try:
        ensure_repository(data_dir(pretrained) / "model_repository", model, pretrained, seed, dtype)
        return data_dir(pretrained), pretrained
    except (WeightsUnavailableError, UnknownModelError) as exc:
        if isinstance(exc, UnknownModelError) and pretrained not in str(exc):
            raise  # an unknown model name, not weights we cannot have
        print(BANNER + f"# reason: {exc}\n", flush=True)
        ensure_repository(data_dir("random") / "model_repository", model, "random", seed, dtype)
        return data_dir("random"), "random"


def _offline_unless_hub_reachable(timeout: float = 3.0) -> None:
    """An unreachable hub costs ~45 s of retries (and a page of warnings) before the download gives up:
    check with one quick connection instead, and when it fails look in the local cache only."""
    import logging
    import socket
    import urllib.parse

    try:
        from huggingface_hub import constants
    except ImportError:
        return
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if constants.HF_HUB_OFFLINE:
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout).close()
    except OSError as exc:
        print(f"   {url.hostname} cannot be reached ({exc}): looking in the local cache only", flush=True)
        constants.HF_HUB_OFFLINE = True  # read at request time by huggingface_hub: fail fast, use the cache


class ServeProcess(ServiceChild):
    """`coca serve` as a supervised child: its output goes straight to a log file (so it never dies of a broken
    pipe half-way through stopping Triton), SIGTERM stops it (both servers shut down cleanly), SIGKILL to its
    process group is the last resort, and it dies with this process."""

    def __init__(self, command: list[str], log_path: Path):
        super().__init__(command, name="`coca serve`", log_file=log_path)
        self.log_path = log_path
        self.web_url: Optional[str] = None

    @property
    def lines(self) -> list[str]:
        """The last lines it wrote."""
        return self.output(60).splitlines(keepends=True)

    def start(self, timeout: float = 600.0) -> "ServeProcess":
        try:
            super().start(timeout)
        except ProcessError as exc:
            raise RuntimeError(f"`coca serve` did not start (log {self.log_path}):\n" + "".join(self.lines)) from exc
        web = WEB_GALLERY.search(self.output())
        self.web_url = web.group(1) if web else None
        return self

    def stop(self, grace: float = 60.0) -> None:
        super().stop(grace)


def run_demo(args) -> int:
    out = Path(args.out).resolve()
    photos = sample_photos(out / "photos")
    print(f"== {len(photos)} sample photos (scikit-image) in {out / 'photos'}")
    started = time.monotonic()
    data, pretrained = export_model(out, args.model, args.pretrained, args.seed, args.dtype)
    print(f"== model repository {data / 'model_repository'} ({args.model}, {pretrained}; "
          f"{time.monotonic() - started:.0f} s)", flush=True)
    # Port 0: `coca serve` binds what the kernel gives and says where in its ready lines (a port picked here
    # and bound there can be taken meanwhile: CI saw Triton take it).
    command = [sys.executable, "-m", "clients.cli", "serve", "--model", args.model, "--pretrained", pretrained,
               "--seed", str(args.seed), "--dtype", args.dtype, "--data", str(data), "--port", str(args.port)]
    if args.serve:
        command += ["--web", str(args.web)]
    print("== starting tritonserver and the search service (`coca serve`) ...", flush=True)
    started = time.monotonic()
    server = ServeProcess(command, data / "serve.log")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it as cleanly as Ctrl-C
    try:
        server.start()
        print(f"   ready on {server.address} in {time.monotonic() - started:.0f} s (log {server.log_path})", flush=True)
        tour(server.address, photos, args, out)
        if args.serve:
            print(f"\n== web gallery on {server.web_url}  (Ctrl-C stops everything)", flush=True)
            while server.proc.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        return 130
    except SearchError as exc:
        print(f"coca demo: error: {exc}\n(`coca serve` log: {server.log_path})", file=sys.stderr, flush=True)
        return 1
    finally:
        _say("== stopping the search service and tritonserver ...")
        server.stop()  # also when printing fails (a closed pipe): _say never raises
        _say(f"   stopped (exit code {server.proc.returncode if server.proc else '-'})")
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def tour(address: str, photos: list[Path], args, out: Path) -> None:
    from clients.coca_client import Client
    from clients.plot_index import fetch_points
    from coca import plots

    with Client(address, timeout=600) as client:
        client.wait_ready(300)
        print(f"\n== indexing {len(photos)} photos (AddImages stream)")
        for result in client.add_files(photos, {"set": "demo"}):
            detail = result.id if result.ok else str(result.error)
            print(f"   {photos[result.index].name:<26} {result.outcome.value:<10} {detail}")
        stats = client.stats()
        print(f"   store: {stats.count} images, index {stats.index_active}, model {stats.model} ({stats.pretrained})")

        for query in args.query or QUERIES:
            started = time.monotonic()
            result = client.search_text(query, k=args.k, with_captions=True)
            print(f"\n== search {query!r} with captions ({(time.monotonic() - started) * 1000:.0f} ms, "
                  f"{result.searched} images)")
            for rank, hit in enumerate(result.hits, 1):
                print(f"   {rank}. {hit.score:6.3f}  {Path(hit.uri).name:<26} {hit.caption or hit.caption_error}")

        photo = next((p for p in photos if p.stem == "coffee"), photos[0])
        started = time.monotonic()
        caption = client.caption(photo)
        print(f"\n== caption of {photo.name} ({(time.monotonic() - started) * 1000:.0f} ms)\n   {caption.text}")

        photo = next((p for p in photos if p.stem == "rocket"), photos[-1])
        labels = client.classify(LABELS, photo)[:3]
        print(f"\n== zero-shot classification of {photo.name}\n   "
              + ", ".join(f"{l.label} {l.probability:.1%}" for l in labels))

        points, thumbs, _, _ = fetch_points(client, None, 1000)
        png = plots.feature_space_png(points, thumbs, out / "tsne.png")
        print(f"\n== feature space of the index (t-SNE, from the stored embeddings): {png}")
