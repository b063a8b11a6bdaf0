#!/usr/bin/env bash
# NVIDIA's perf_analyzer (PyPI perf-analyzer) on Debian 12, for cross-checking benchmark figures.
#
# perf-analyzer's wheels are manylinux_2_38 (glibc 2.38, libstdc++ from GCC 13+); Debian 12 has
# glibc 2.36, so `pip install perf-analyzer` quietly installs a 0.1.0 placeholder instead. This
# script downloads the real wheel for that platform (pip download --platform) and Debian 13's
# libc6, libstdc++6 and libgcc-s1 (apt-get download), and runs the binary through Debian 13's
# dynamic loader. Nothing is installed: the files go to $PA_HOME (default data/perf_analyzer).
#
#   scripts/perf_analyzer.sh -m coca_image_encoder -u 127.0.0.1:8001 -i grpc -b 8 --input-data images.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
home="${PA_HOME:-data/perf_analyzer}"
version="${PA_VERSION:-2.60.0}"
bin="$home/wheel/perf_analyzer/bin/perf_analyzer"
libs="$home/debian13/usr/lib/x86_64-linux-gnu"
mkdir -p "$home"
home="$(cd "$home" && pwd)"

if [[ ! -x "$bin" ]]; then
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
        --python-version 3.11 -d "$home/download" "perf-analyzer==$version"
    rm -rf "$home/wheel" && mkdir -p "$home/wheel"
    (cd "$home/wheel" && unzip -q "$home"/download/perf_analyzer-"$version"-*.whl)
    chmod +x "$bin"
fi

if [[ ! -e "$libs/libc.so.6" ]]; then
    apt_home="$home/apt"
    mkdir -p "$apt_home/lists/partial" "$apt_home/debs"
    echo "deb http://deb.debian.org/debian trixie main" > "$apt_home/sources.list"
    apt=(-o "Dir::Etc::sourcelist=$apt_home/sources.list" -o Dir::Etc::sourceparts=- \
         -o "Dir::State::Lists=$apt_home/lists" -o APT::Get::List-Cleanup=0)
    apt-get "${apt[@]}" update -qq
    (cd "$apt_home/debs" && apt-get "${apt[@]}" download libc6 libstdc++6 libgcc-s1 2>/dev/null)
    for deb in "$apt_home"/debs/*.deb; do dpkg -x "$deb" "$home/debian13"; done
fi

exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "$bin" "$@"
