#!/usr/bin/env bash
# Create or refresh the project venv (.venv) so that it matches pyproject.toml.
#
# Idempotent: a stamp file inside the venv holds a hash of pyproject.toml (and
# of this script); when it matches and the interpreter still runs, nothing is
# done. Override the interpreter with PYTHON=..., the venv location with VENV=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.bootstrap-stamp"

want_stamp="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

# A venv whose interpreter no longer starts (moved, or its base Python was
# removed) cannot be repaired by pip: start it again.
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "bootstrap: $VENV is broken, recreating it" >&2
    rm -rf "$VENV"
fi

# --- Non-Python pieces (before the venv stamp: each checks itself and costs nothing when done) ---

# The Node.js client (clients/node) and its test: `npm ci` from the committed package-lock.json,
# again only when the lock file changed. Skipped where node/npm are missing (its test then skips).
NODE_DIR="$ROOT/clients/node"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && [[ -f "$NODE_DIR/package-lock.json" ]]; then
    node_stamp="$NODE_DIR/node_modules/.coca-bootstrap-stamp"
    want_node="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
    if [[ ! -f "$node_stamp" || "$(cat "$node_stamp")" != "$want_node" ]]; then
        echo "bootstrap: npm ci in clients/node" >&2
        if (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2); then
            echo "$want_node" > "$node_stamp"
        else
            echo "bootstrap: WARNING: npm ci failed in clients/node (the Node client test will fail)" >&2
        fi
    fi
fi

# The web gallery's browser test drives Debian's chromium through chromium-driver (Selenium). CI runs
# as root on a fresh Debian machine without them, so install them there, once: only when missing, only
# as root with apt-get, never otherwise (elsewhere the browser test skips and says why).
# COCA_NO_BROWSER=1 skips this.
if [[ "${COCA_NO_BROWSER:-0}" != 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
        && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
    echo "bootstrap: installing chromium + chromium-driver (apt-get) for the browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >&2 \
        || echo "bootstrap: WARNING: could not install chromium (the browser test will skip)" >&2
fi

# docker-compose.yml is validated with `docker-compose config` (Debian's Compose v1: no Docker engine is
# needed to check a file). Installed the same way as chromium: as root, only when no Compose is there.
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1 \
        && ! docker compose version >/dev/null 2>&1; then
    echo "bootstrap: installing docker-compose (apt-get) to validate docker-compose.yml" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; } >&2 \
        || echo "bootstrap: WARNING: could not install docker-compose (the compose test will skip)" >&2
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: creating $VENV with $("$PYTHON" --version)" >&2
    "$PYTHON" -m venv "$VENV"
fi

# torch==2.13.0 resolves to the CPU wheel that pip's configuration finds on
# local disk; the global pip constraint file (torch<=2.14.1) is compatible.
# The grep drops pip's warnings about this machine's local package mirrors,
# which hold only some packages ("Location 'file:///...' is ignored"); with
# pipefail a pip failure still fails the script.
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }

site_packages="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
py_version="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# Environment workaround, NOT part of the package: PyPI's torchvision 0.28.0
# x86_64 wheel is a CUDA build, and with the CPU torch 2.13.0 its import dies in
# torchvision/_meta_registrations.py with
#   RuntimeError: operator torchvision::nms does not exist
# because its C ops need libtorch_cuda. Pre-registering an empty module under
# that name at interpreter start skips the registration: transforms (which
# open_clip uses) work, torchvision.ops (nms, roi_align) do not. The "zz_"
# prefix makes site.py process it after the other .pth files.
echo "import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))" \
    > "$site_packages/zz_torchvision_cpu_shim.pth"

# tritonserver from the nvidia-pytriton wheel only loads the Python backend
# when the stub sits at <backend-dir>/python/triton_python_backend_stub; the
# wheel ships one stub per Python version elsewhere. Copy the one matching the
# venv so `--backend-directory=<site-packages>/pytriton/tritonserver/backends`
# works without PyTriton.
triton_dir="$site_packages/pytriton/tritonserver"
stub_src="$triton_dir/python_backend_stubs/$py_version/triton_python_backend_stub"
stub_dst="$triton_dir/backends/python/triton_python_backend_stub"
if [[ ! -f "$stub_src" ]]; then
    echo "bootstrap: no Triton Python backend stub for Python $py_version at $stub_src" >&2
    exit 1
fi
if ! cmp -s "$stub_src" "$stub_dst"; then
    cp "$stub_src" "$stub_dst"
    chmod +x "$stub_dst"
fi

"$VENV/bin/python" -c 'import torch, torchvision, open_clip' \
    || { echo "bootstrap: the venv installed but torch/torchvision/open_clip do not import" >&2; exit 1; }

echo "$want_stamp" > "$STAMP"
echo "bootstrap: $VENV is ready" >&2
