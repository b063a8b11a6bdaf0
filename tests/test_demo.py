"""`make demo` itself, with coca-tiny (no pretrained tag: the random-weights banner path) to keep CI time
down: it must print captioned hits and an image caption, and leave no process of its own behind."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.testing import triton_unavailable_reason

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

ROOT = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def demo_command(out: Path) -> list[str]:
    args = f"--model coca-tiny --out {out}"
    venv = Path(sys.prefix)
    if shutil.which("make") and (venv / ".bootstrap-stamp").is_file():
        # The real entry point; bootstrap.sh returns at once on a venv it has built.
        return ["make", "-s", "demo", f"VENV={venv}", f"DEMO_ARGS={args}"]
    return [sys.executable, "-m", "clients.cli", "demo", *args.split()]


def test_make_demo(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(demo_command(out), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    output = result.stdout
    print(output[-4000:], result.stderr[-2000:], f"({time.monotonic() - started:.0f} s)")
    assert result.returncode == 0, result.stderr[-3000:]

    assert "Pretrained weights are not reachable here: using RANDOM weights" in output
    # Indexed: 12 photos, `cat` is `chelsea` again and is stored once.
    outcomes = dict(re.findall(r"^   (\w+)\.jpg\s+(added|duplicate|failed)\b", output, re.M))
    assert len(outcomes) == 12 and "failed" not in outcomes.values() and outcomes["cat"] == "duplicate"
    assert "store: 11 images" in output
    # Three text searches, each with 3 captioned hits.
    blocks = re.findall(r"^== search '([^']+)' with captions.*\n((?:   \d\..*\n)+)", output, re.M)
    assert [query for query, _ in blocks] == ["a cat", "an astronaut in a space suit", "a cup of coffee"]
    for _, hits in blocks:
        rows = re.findall(r"^   \d\.\s+(-?\d\.\d{3})\s+(\S+\.jpg)\s+(\S.*)$", hits, re.M)
        assert len(rows) == 3 and all(caption.strip() for _, _, caption in rows)
    caption = re.search(r"^== caption of coffee\.jpg \(\d+ ms\)\n   (\S.*)$", output, re.M)
    assert caption and caption.group(1).strip()
    assert re.search(r"^== zero-shot classification of rocket\.jpg\n   \w+ \d+\.\d%", output, re.M)
    assert (out / "tsne.png").stat().st_size > 10_000
    assert "stopped (exit code 0)" in output
    # Nothing it started outlives it: tritonserver, its Python-backend stubs, `coca serve`.
    deadline = time.monotonic() + 15
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(out)) == []
