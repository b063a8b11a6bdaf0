"""Benchmarks: programs that print a table and, last, one JSON line.

Each compares side by side in one run (ours vs open_clip, Triton vs in-process)
and reports ratios, because this machine is noisy. Run as `coca bench NAME ...`
or `python -m bench NAME ...`.
"""
import importlib
import sys

BENCHMARKS = {
    "caption": "bench.caption",
    "export-defaults": "bench.export_defaults",  # export, tritonserver start, RSS: onnx+iterative vs torch+sequence
    "search": "bench.search",  # text -> image search latency, recall@10, index build (search service)
    "ingest": "bench.ingest",  # AddImages images/s vs in-process embed_images (search service)
    "reindex": "bench.reindex",  # reindex into new weights vs plain ingest rate; search p99 during it vs idle
    "service": "bench.service",  # the search service process: launch -> ready seconds, RSS, torch mapped or not
    "triton-caption": "bench.triton_caption",  # captions/s through Triton's decoder at 1..32 concurrent sequences
    "triton-encode": "bench.triton_encode",  # images/s through Triton vs in-process embed_images
    "triton-endpoints": "bench.triton_endpoints",
    "video": "bench.video",  # AddVideos: video seconds per wall second vs decode-alone and embed-alone floors, peak RSS  # captions/s through two Triton endpoints vs one (serving.pool)
}


def run(name: str, argv: list[str]) -> int:
    if name not in BENCHMARKS:
        print(f"coca bench: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[name]).main(argv) or 0
