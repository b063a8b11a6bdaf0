"""Video ingest: video seconds indexed per wall second through the service (AddVideos -> scenes), beside the
floors of its two stages alone, and the service's memory high-water mark for a short and a long video.

    coca bench video [--model coca_ViT-B-32 --pretrained random] [--seconds 30,120] [--every 0.5]

The videos are made here: H.264 at --size, --fps, a new picture (a scikit-image sample photo, panning) every
few seconds, so decoding does real work. Stages, each timed alone on the longest video:
  * decode floor: search_service.video.frame_chunks (PyAV decode of every frame, the sampled ones downscaled,
    PNG-encoded for the encoder, JPEG keyframe candidates): what the service's decoding thread does;
  * embed floor: the same sampled frames' PNGs through Triton's image encoder (bench/ingest.py triton_alone:
    serving.client, 16 a request, all in flight at once);
  * the service: one AddVideos call per video (fresh data dir each), clock from send to the committed result.
Ingest overlaps the two stages (the next chunk decodes while one embeds), so its ceiling is the slower floor;
the goal (issue 21) is >= 0.8x that. Peak RSS is the service process's VmHWM after each video: bounded means it
does not grow with the video's length.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from .common import add_model_options, print_json, print_table, sample_images
from .ingest import triton_alone
from .triton_common import add_encoder_options, encoder_settings, encoder_suffix


def parse(argv):
    p = argparse.ArgumentParser(prog="coca bench video", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--seconds", default="30,120", help="video lengths, comma-separated (peak RSS of each)")
    p.add_argument("--every", type=float, default=0.5, help="sampling interval, video seconds")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--size", default="640x360")
    p.add_argument("--scene-s", type=float, default=4.0, help="a new picture this often")
    add_encoder_options(p)
    p.add_argument("--cache", default="data/bench/video")
    return p.parse_args(argv)


def make_video(seconds: float, fps: int, size: tuple[int, int], scene_s: float) -> bytes:
    """H.264 in MP4: a sample photo panning slowly, a new photo every `scene_s` seconds."""
    import av

    photos = [p.resize((size[0] * 5 // 4, size[1] * 5 // 4)) for p in sample_images(6)]
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for i in range(int(seconds * fps)):
            t = i / fps
            photo = photos[int(t / scene_s) % len(photos)]
            shift = int((t % scene_s) / scene_s * size[0] / 4)  # pan a quarter of the width over a scene
            frame = av.VideoFrame.from_image(photo.crop((shift, 0, shift + size[0], size[1])))
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def decode_floor(video: bytes, every_s: float) -> tuple[float, list[bytes]]:
    """Seconds the decoding stage takes alone, and the sampled frames' PNGs it made."""
    from coca.media import VideoLimits
    from search_service.video import frame_chunks

    started = time.perf_counter()
    pngs = [f.png for chunk in frame_chunks(video, every_s, VideoLimits()) if isinstance(chunk, list) for f in chunk]
    return time.perf_counter() - started, pngs


def through_service(url: str, video: bytes, every_s: float) -> tuple[float, int, int]:
    """(seconds, scenes, service peak RSS in bytes) of one AddVideos call on a fresh service."""
    from clients.coca_client import Client, Outcome, video_options
    from search_service.testing import ServiceProcess

    with tempfile.TemporaryDirectory(prefix="coca-video-") as data, ServiceProcess(data, url) as service, \
            Client(service.address, timeout=3600) as client:
        client.search_text("warm up")  # binds the store and opens the index before the clock starts
        started = time.perf_counter()
        (result,) = client.add_videos([video], options=video_options(every_s=every_s))
        elapsed = time.perf_counter() - started
        if result.outcome is not Outcome.ADDED:
            raise RuntimeError(f"AddVideos: {result}")
        return elapsed, len(result.video.scenes), peak_rss(service.proc.pid)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    from serving.launcher import TritonServer
    from serving.repository import ensure_repository

    args = parse(argv)
    lengths = [float(s) for s in args.seconds.split(",")]
    size = tuple(int(v) for v in args.size.split("x"))
    videos = {s: make_video(s, args.fps, size, args.scene_s) for s in lengths}
    longest = max(lengths)
    decode_s, pngs = decode_floor(videos[longest], args.every)
    repository, _ = ensure_repository(Path(args.cache) / f"repo-{args.model}-{args.pretrained}-s{args.seed}{encoder_suffix(args)}",
                                      args.model, args.pretrained, args.seed, encoders=encoder_settings(args))
    with TritonServer(repository, kill_on_parent_exit=True).start(timeout=600) as triton:
        embed_s = len(pngs) / triton_alone(triton.grpc_url, pngs)  # the embedding stage alone
        runs = {s: through_service(triton.grpc_url, videos[s], args.every) for s in lengths}
    decode_rate, embed_rate = longest / decode_s, longest / embed_s
    floor = min(decode_rate, embed_rate)
    rows = [[f"decode alone ({len(pngs)} frames sampled of {longest:g} s)", f"{decode_rate:.2f}", f"{decode_rate / floor:.2f}", ""],
            [f"embed alone (Triton, {len(pngs)} frames)", f"{embed_rate:.2f}", f"{embed_rate / floor:.2f}", ""]]
    for s, (seconds, scenes, rss) in runs.items():
        rows.append([f"service AddVideos, {s:g} s video ({scenes} scenes)", f"{s / seconds:.2f}",
                     f"{s / seconds / floor:.2f}", f"{rss / 2 ** 20:.0f}"])
    load = os.getloadavg()
    print(f"{args.model} ({args.pretrained}); H.264 {args.size} {args.fps} fps, a frame sampled every {args.every:g} s; "
          f"Triton encoders: {args.encoder_runtime} {args.encoder_precision}; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}; floor = the slower stage alone; goal: service >= 0.8x floor, RSS flat in video length")
    print_table(["path", "video s / s", "vs floor", "peak RSS MiB"], rows)
    service_rate = longest / runs[longest][0]
    print_json({"benchmark": "video", "model": args.model, "every_s": args.every, "size": args.size, "fps": args.fps,
                "decode_floor": round(decode_rate, 3), "embed_floor": round(embed_rate, 3),
                "service": {str(s): round(s / r[0], 3) for s, r in runs.items()},
                "ratio_vs_floor": round(service_rate / floor, 3), "target_ratio": 0.8,
                "peak_rss_mib": {str(s): round(r[2] / 2 ** 20) for s, r in runs.items()},
                "scenes": {str(s): r[1] for s, r in runs.items()}, "load_average": round(load[0], 2)})
    return 0
