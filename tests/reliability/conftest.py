"""Reliability suite: faults, bad input, load and security against the real processes.

One tritonserver for the whole package (coca-tiny, random weights; a small decoder cache with a short
idle TTL, so expiry can be watched), on fixed ports so fault tests can kill it and start it again at
the same address. Search services are started per module or per test with `search_service.testing`.

Every test records its figures with the `figures` fixture; they are written as JSON (to
$COCA_RELIABILITY_REPORT, default <pytest basetemp>/reliability-report.json) and printed as a table
at the end of the run. Tests marked `long` run only in `make test-reliability`.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.testing import triton_unavailable_reason

MODEL, PRETRAINED, SEED = "coca-tiny", "random", 0
CAPACITY = 48  # decoder cache rows: the cap test fills them; the load test's captions stay below
IDLE_S = 2.0  # Triton forgets a silent sequence after this; the model's TTL is IDLE_S + 0.5
EXPIRY_INTERVAL_S = 0.25

needs_triton = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))
# The quick variant of a long test (e.g. 64 clients x 10 s beside x 60 s): make test runs it, make test-reliability
# (-m long) runs only the long one, which checks everything the quick one does.
short = pytest.mark.short


# ---------------------------------------------------------------- figures
class Figures:
    """Figures per test (name -> dict), kept in the order tests recorded them."""

    def __init__(self):
        self.sections: dict[str, dict] = {}
        self.lock = threading.Lock()

    def record(self, section: str, **values) -> None:
        with self.lock:
            self.sections.setdefault(section, {}).update(values)

    def path(self, basetemp: Path) -> Path:
        return Path(os.environ.get("COCA_RELIABILITY_REPORT") or basetemp / "reliability-report.json")


FIGURES = Figures()
_REPORT_PATH: list[Path] = []


@pytest.fixture(scope="session")
def figures(tmp_path_factory):
    yield FIGURES
    path = FIGURES.path(tmp_path_factory.getbasetemp())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIGURES.sections, indent=2, sort_keys=False) + "\n")
    _REPORT_PATH.append(path)


def pytest_terminal_summary(terminalreporter):
    if not FIGURES.sections:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability figures")
    width = max(len(k) for s in FIGURES.sections.values() for k in s)
    for section, values in FIGURES.sections.items():
        write(section)
        for key, value in values.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            write(f"  {key:<{width}}  {shown}")
    if _REPORT_PATH:
        write(f"(written to {_REPORT_PATH[-1]})")


# ---------------------------------------------------------------- Triton and services
@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """coca-tiny exported with a small decoder cache and a short TTL; (repository, logit_scale)."""
    import coca
    from serving.repository import DecoderSettings, export_repository

    repo = tmp_path_factory.mktemp("reliability") / "model_repository"
    model = coca.load(MODEL, pretrained=PRETRAINED, seed=SEED)
    settings = DecoderSettings(capacity_rows=CAPACITY, sequence_idle_s=IDLE_S, expiry_interval_s=EXPIRY_INTERVAL_S)
    export_repository(model, repo, decoder=settings)
    return repo, model.logit_scale


@pytest.fixture(scope="session")
def reference():
    """The in-process model Triton serves (the oracle of captions and embeddings)."""
    import coca

    return coca.load(MODEL, pretrained=PRETRAINED, seed=SEED)


@pytest.fixture(scope="session")
def triton(exported):
    """A TritonServer on fixed ports (start() again after a kill comes back at the same address)."""
    reason = triton_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from serving.testing import restartable_triton

    with restartable_triton(exported[0]) as server:
        yield server


@pytest.fixture
def live_triton(triton):
    """The shared Triton, started again if an earlier test left it down."""
    return triton.ensure_running()


def service_args(exported, *extra: str) -> tuple[str, ...]:
    return ("--logit-scale", str(exported[1]), *extra)


# ---------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def unique_jpegs(seed: int, count: int, size: int = 64) -> list[bytes]:
    """`count` distinct small JPEGs (smooth colour fields plus noise, different for every seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        big = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR), np.int16)
        noisy = np.clip(big + rng.integers(-12, 12, big.shape), 0, 255).astype(np.uint8)
        out.append(encode(Image.fromarray(noisy), quality=85))
    return out


# ---------------------------------------------------------------- processes
def rss_bytes(pid: int) -> int:
    """Resident set size of one process from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class RssSampler:
    """Samples the RSS of a set of processes (callable returning pids) every `interval` s in a thread."""

    def __init__(self, pids, interval: float = 0.5):
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), sum(rss_bytes(p) for p in self.pids())))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def values(self) -> list[int]:
        return [v for _, v in self.samples if v]


@pytest.fixture(scope="session")
def roots(tmp_path_factory):
    """An allowed root (good files, a nested one, a symlink escaping it) and a file outside it."""
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(unique_jpegs(500, 1)[0])
    (root / "ok.jpg").write_bytes(unique_jpegs(501, 1)[0])
    (root / "nested").mkdir()
    (root / "nested" / "ok2.png").write_bytes(encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    (root / "escape.jpg").symlink_to(outside)
    (root / "escape_dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "not_an_image.jpg").write_bytes(b"plain text, not an image")
    return root, outside


@pytest.fixture(scope="session")
def shared_service(tmp_path_factory, triton, exported, roots):
    """One search service for the fuzz, load and Triton-fault tests (default bind, server-side paths under `roots`)."""
    from search_service.testing import ServiceProcess

    data = tmp_path_factory.mktemp("shared-data")
    with ServiceProcess(data, triton.grpc_url, "--root", str(roots[0]), *service_args(exported)) as process:
        yield process
