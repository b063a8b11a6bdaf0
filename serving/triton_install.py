"""Find the Triton install: the ``tritonserver`` tree the ``nvidia-pytriton`` wheel ships, and the
Python environment its Python-backend stubs must run in.

The wheel has a complete server tree under ``site-packages/pytriton/tritonserver/``
(``bin/tritonserver``, ``backends/python``, ``caches/local``) and one Python-backend stub per
Python version under ``python_backend_stubs/<major.minor>/``. The Python backend looks for its
stub next to ``libtriton_python.so`` (``<backend-dir>/python/triton_python_backend_stub``) and
the wheel does not put it there. Rather than writing into site-packages at run time, each server
gets a private backend directory (``prepare_backend_dir``: symlinks to the wheel's files plus the
stub for *our* Python version). Running it is serving/launcher.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import TritonServerError

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonDist:
    """Where the server tree of the installed ``nvidia-pytriton`` wheel lives."""

    root: Path  # .../site-packages/pytriton/tritonserver
    server_bin: Path
    backends_dir: Path
    caches_dir: Path
    stub: Path  # the stub built for the requested Python version
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs (auditwheel-vendored libraries)


@dataclass(frozen=True)
class PythonEnv:
    """The Python environment the stubs should run in (normally the one running us)."""

    executable: Path  # not resolved: <venv>/bin/python
    bin_dir: Path  # goes first in PATH
    version: tuple[int, int]
    libdir: Path | None  # directory holding libpython3.X.so.1.0 (sysconfig LIBDIR), if shared


def python_env(executable: str | os.PathLike | None = None) -> PythonEnv:
    """Describe the interpreter whose environment the Python-backend stubs must use."""
    if executable is None:
        exe = Path(sys.executable)
        version = (sys.version_info.major, sys.version_info.minor)
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    else:
        exe = Path(executable)
        code = (
            "import json, sys, sysconfig; print(json.dumps([sys.version_info[:2], "
            "sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('INSTSONAME')]))"
        )
        try:
            out = subprocess.run([str(exe), "-I", "-c", code], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise TritonServerError(f"cannot run the Python interpreter {exe}: {exc}") from exc
        (major, minor), libdir, ldlibrary = json.loads(out)
        version = (int(major), int(minor))
    exe = Path(os.path.abspath(exe))  # absolute, but keep the venv's symlink
    if not (exe.parent / "python3").exists():
        warnings.warn(
            f"{exe.parent} has no 'python3': the Python-backend stub finds its environment by "
            "searching PATH for python3 and will fall back to another interpreter's site-packages",
            RuntimeWarning,
            stacklevel=2,
        )
    shared = None
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).exists():
        shared = Path(libdir)
    return PythonEnv(executable=exe, bin_dir=exe.parent, version=version, libdir=shared)


def find_triton(python_version: tuple[int, int] | None = None) -> TritonDist:
    """Locate the ``tritonserver`` tree inside the installed ``nvidia-pytriton`` package.

    Only looks the package up (``importlib.util.find_spec``); ``pytriton`` is not imported.
    """
    if python_version is None:
        python_version = (sys.version_info.major, sys.version_info.minor)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the nvidia-pytriton package is not installed in this environment; it provides the "
            "tritonserver binary (pip install nvidia-pytriton==0.7.0)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    tag = f"{python_version[0]}.{python_version[1]}"
    dist = TritonDist(
        root=root,
        server_bin=root / "bin" / "tritonserver",
        backends_dir=root / "backends",
        caches_dir=root / "caches",
        stub=root / "python_backend_stubs" / tag / STUB_NAME,
        libs_dir=root.parent.parent / "nvidia_pytriton.libs",
    )
    if not os.access(dist.server_bin, os.X_OK):
        raise TritonServerError(f"no executable tritonserver at {dist.server_bin}")
    if not (dist.backends_dir / "python" / "libtriton_python.so").exists():
        raise TritonServerError(f"no Python backend at {dist.backends_dir / 'python'}")
    if not dist.stub.exists():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"no Python-backend stub for Python {tag} at {dist.stub} (the wheel has: {', '.join(have) or 'none'})"
        )
    return dist


def prepare_backend_dir(dist: TritonDist, dest: str | os.PathLike) -> Path:
    """Assemble a backend directory at *dest* out of symlinks into the wheel.

    ``dest/python/`` gets links to every file of the wheel's Python backend and to the stub
    for our Python version; other backends (none in 0.7.0) are linked as whole directories.
    Nothing is written into site-packages.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dist.backends_dir.iterdir():
        if entry.name == "python":
            continue
        link = dest / entry.name
        if not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    py = dest / "python"
    py.mkdir(exist_ok=True)
    for entry in (dist.backends_dir / "python").iterdir():
        if entry.name in ("__pycache__", STUB_NAME):
            continue
        link = py / entry.name
        if not link.exists():
            link.symlink_to(entry)
    stub = py / STUB_NAME
    if not stub.exists():
        stub.symlink_to(dist.stub)
    return dest
