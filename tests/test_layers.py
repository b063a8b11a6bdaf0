"""The layers point one way (coca <- serving <- search_service <- clients; bench beside them), checked by
import-linter over the import graph (function-level imports included). Contracts: pyproject.toml."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([command, "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_import_contracts_hold():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout


def test_the_running_service_loads_no_model_stack():
    """The import graph is one half (contract service-light); this is the other: what a started service
    process has actually loaded, lazy imports included, and how long its imports take."""
    probe = ("import sys, time; t = time.perf_counter(); import search_service.server, search_service.process; "
             "print(sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules), "
             "round(time.perf_counter() - t, 2))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, seconds = result.stdout.split("]")
    assert loaded == "[", f"the search service imported {loaded}]"
    assert float(seconds) < 5, f"the search service's imports took {seconds.strip()} s"
