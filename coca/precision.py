"""Precision chosen per machine, never at the cost of answers (`coca export --precision auto`).

    record = choose_precision(model, cpu_features(), encoder_runtime="onnxruntime")
    record["chosen"]        # {"encoders": "int8", "decoder": "fp32"}: what the export then writes
    record["candidates"]    # every candidate's gate figures and timings (the repository manifest keeps them)

Candidates are the (encoders, decoder) precisions this CPU runs fast: fp32 always; int8 where it has
VNNI (coca/cpu.py) -- the encoders' int8 is ONNX Runtime's MatMulNBits (coca/onnx_encoders.py, only
with the onnxruntime runtime), the decoder's is coca/quant.py; a bf16 decoder where it has
AVX512-BF16 or AMX (coca/quant.py: bf16 weights, fp32 accumulation). Encoders have no bf16 candidate:
see BF16_ENCODERS.
Each candidate runs a calibration set generated here (random images and texts, seeded) beside fp32
of the same encoder runtime, and passes when every gate holds:

  * text and image embeddings: cosine to fp32 >= 0.999, the worst item of each;
  * top-10 overlap with fp32 >= 0.98 on an index of `index_size` items (text and image queries). The
    items are fixed random mixtures of three calibration images' embeddings (the same mixtures for
    both), so a candidate's error reaches every item without encoding 100k images;
  * greedy captions of the calibration images token-equal to fp32's on >= 95 %;
  * a reduced-precision decoder: the first `alone` calibration images captioned one at a time
    equal their captions made in one batch (this machine's kernels may pick another path for
    one row than for many; a batch must never change a caption).

The fastest passing candidate is kept; "fastest" is its cost per item: one image and one text encoded
plus `max_tokens` decode steps at batch 1 (the best of 3 turns of 8 steps, the candidates alternating), timed on this machine
now (timings under load are noisy: the load average goes into the record). fp32 is the reference and always passes.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .cpu import FEATURES, describe_cpu, has_bf16, has_vnni
from .generate import generate
from .sampling import SOT, SamplingParams

GATES = {"embedding_cosine": 0.999, "top10_overlap": 0.98, "captions_equal": 0.95, "batch_invariant": 1.0}
INDEX_SIZE = 100_000  # the index; tests of random-weight tiny models pass a smaller one
TOP_K = 10
BF16_ENCODERS = ("bf16 encoders: ONNX Runtime's CPU provider has no bf16 MatMul/Gemm kernels; "
                 "the encoders stay fp32 or int8")
WORDS = ("a photo of the dog cat red blue small large old man woman child on in under next to with running "
         "sitting beach street table sofa car tree flag coffee cup two three sunset night snow green").split()


@dataclass(frozen=True)
class Calibration:
    """The generated calibration set and the index the top-10 gate searches."""

    images: int = 32
    texts: int = 64
    index_size: int = INDEX_SIZE
    max_tokens: int = 20
    seed: int = 0
    alone: int = 8  # images captioned one at a time for the batch-invariance gate


@dataclass(frozen=True)
class Candidate:
    encoders: str
    decoder: str


def candidates(features: frozenset[str], encoder_runtime: str) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates this CPU runs fast, fp32 first, and why the others are not tried."""
    skipped, encoders, decoders = {}, ["fp32"], ["fp32"]
    if has_vnni(features):
        decoders.append("int8")
        if encoder_runtime == "onnxruntime":
            encoders.append("int8")
        else:
            skipped["int8 encoders"] = "int8 encoders need the onnxruntime runtime (--format onnx)"
    else:
        skipped["int8"] = "no VNNI (avx512_vnni/avx_vnni/amx_int8) on this CPU: int8 gains nothing here"
    if has_bf16(features):
        decoders.append("bf16")
        skipped["bf16 encoders"] = BF16_ENCODERS
    else:
        skipped["bf16"] = "no AVX512-BF16/AMX on this CPU: bf16 is emulated here"
    return [Candidate(e, d) for e in encoders for d in decoders], skipped


def quantized_decoder(model, precision: str):
    """A copy of `model`'s net with the decode step in `precision` (the model itself stays fp32)."""
    from .quant import quantize

    return quantize(copy.deepcopy(model.net), precision)


def choose_precision(model, features: frozenset[str], encoder_runtime: str = "torch",
                     calibration: Calibration = Calibration(),
                     decoder_twin: Callable = quantized_decoder) -> dict:
    """Measure each candidate against fp32 and keep the fastest that passes every gate (module doc).

    decoder_twin(model, precision) -> net: how a candidate's decoder is made (tests inject a broken one)."""
    todo, skipped = candidates(features, encoder_runtime)
    record = {"mode": "auto", "cpu": describe_cpu(), "features": sorted(f for f in FEATURES if f in features),
              "load_average": round(os.getloadavg()[0], 2), "gates": GATES, "calibration": asdict(calibration),
              "encoder_runtime": encoder_runtime, "skipped": skipped}
    if len(todo) == 1:  # fp32 alone: nothing to compare, nothing to measure (an export pays nothing)
        return {**record, "chosen": asdict(todo[0]), "candidates": [{**asdict(todo[0]), "passed": True, "failed": []}]}
    images, texts = calibration_set(calibration)
    params = SamplingParams(max_tokens=calibration.max_tokens)
    with tempfile.TemporaryDirectory(prefix="coca-precision-") as scratch:
        encoded = {p: encode_calibration(model, encoder_runtime, p, images, texts, scratch) for p in {c.encoders for c in todo}}
    nets = {p: model.net if p == "fp32" else decoder_twin(model, p) for p in {c.decoder for c in todo}}
    steps = _interleaved_best(nets, rounds=3)
    reference = encoded["fp32"]
    tops = {p: index_top_k(found, calibration) for p, found in encoded.items()}
    # each decoder's captions of fp32's image embeddings: the candidates with fp32 encoders, and the batch the
    # invariance gate compares single captions with
    batched = {p: _captions(net, reference["image_embeddings"], params) for p, net in nets.items()}
    reference_captions = batched["fp32"]
    invariant = {p: _batch_invariance(net, reference["image_embeddings"], batched[p], params, calibration.alone)
                 for p, net in nets.items() if p != "fp32"}
    rows = []
    for candidate in todo:
        enc = encoded[candidate.encoders]
        captions = (batched[candidate.decoder] if candidate.encoders == "fp32"
                    else _captions(nets[candidate.decoder], enc["image_embeddings"], params))
        figures = {
            "text_cosine": _worst_cosine(reference["texts"], enc["texts"]),
            "image_cosine": _worst_cosine(reference["images"], enc["images"]),
            "top10_overlap": overlap(tops["fp32"], tops[candidate.encoders]),
            "captions_equal": sum(a == b for a, b in zip(captions, reference_captions)) / len(captions),
            "batch_invariant": invariant.get(candidate.decoder, 1.0),
            "encode_ms_per_item": 1e3 * enc["seconds_per_item"],
            "step_ms": 1e3 * steps[candidate.decoder],
        }
        figures["cost_ms"] = figures["encode_ms_per_item"] + calibration.max_tokens * figures["step_ms"]
        failed = [name for name, ok in (
            ("text_cosine", figures["text_cosine"] >= GATES["embedding_cosine"]),
            ("image_cosine", figures["image_cosine"] >= GATES["embedding_cosine"]),
            ("top10_overlap", figures["top10_overlap"] >= GATES["top10_overlap"]),
            ("captions_equal", figures["captions_equal"] >= GATES["captions_equal"]),
            ("batch_invariant", figures["batch_invariant"] >= GATES["batch_invariant"])) if not ok]
        rows.append({**asdict(candidate), **{k: round(v, 5) for k, v in figures.items()},
                     "passed": not failed, "failed": failed})
    rows[0]["passed"], rows[0]["failed"] = True, []  # fp32 is the reference (its own figures are 1.0)
    best = min((r for r in rows if r["passed"]), key=lambda r: r["cost_ms"])
    return {**record, "chosen": {"encoders": best["encoders"], "decoder": best["decoder"]}, "candidates": rows}


def fixed_precision(encoders: str, decoder: str) -> dict:
    """The manifest's record of a precision asked for by name (no measurement)."""
    return {"mode": "fixed", "chosen": {"encoders": encoders, "decoder": decoder}}


def summary(record: dict) -> str:
    """One line: "encoders int8, decoder fp32 (auto)" -- what configs, Stats and /metrics carry."""
    chosen = record["chosen"]
    return f"encoders {chosen['encoders']}, decoder {chosen['decoder']} ({record['mode']})"


# --- calibration -------------------------------------------------------------------------
def calibration_set(calibration: Calibration) -> tuple[list, list[str]]:
    """Random images (smooth colour fields with noise, different sizes) and random word texts, seeded."""
    from PIL import Image

    rng = np.random.default_rng(calibration.seed)
    images = []
    for _ in range(calibration.images):
        h, w = rng.integers(64, 320, size=2)
        corners = rng.uniform(0, 255, size=(2, 2, 3))
        ys, xs = np.linspace(0, 1, h)[:, None, None], np.linspace(0, 1, w)[None, :, None]
        field = (corners[0, 0] * (1 - ys) * (1 - xs) + corners[0, 1] * (1 - ys) * xs
                 + corners[1, 0] * ys * (1 - xs) + corners[1, 1] * ys * xs)
        pixels = np.clip(field + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 16))) for _ in range(calibration.texts)]
    return images, texts


def encode_calibration(model, runtime: str, precision: str, images: list, texts: list[str], scratch: str) -> dict:
    """Text and image embeddings (normalised), image embeddings for the decoder, and the seconds they took."""
    pixels, tokens = model.pixels(images), model.tokenize(texts)
    if runtime == "onnxruntime":
        from .onnx_encoders import IMAGE_FILE, TEXT_FILE, OnnxEncoder, write_onnx_encoders

        files = write_onnx_encoders(model, os.path.join(scratch, precision), precision)
        text, image = OnnxEncoder(files[TEXT_FILE]), OnnxEncoder(files[IMAGE_FILE])
        encode_texts = lambda: text.encode_texts(model.net.text, tokens)  # noqa: E731
        encode_pixels = lambda: image.encode_pixels(pixels)  # noqa: E731
    else:
        encode_texts = lambda: model.net.text(tokens).class_embedding  # noqa: E731

        def encode_pixels():
            encoding = model.net.visual(pixels)
            return encoding.class_embedding, encoding.image_embeddings
    with torch.inference_mode():
        encode_texts(), encode_pixels()  # warm-up
        start = time.perf_counter()
        text_embs = encode_texts()
        middle = time.perf_counter()
        image_class, image_embs = encode_pixels()
        end = time.perf_counter()
    # one text and one image: what each item of an ingest and each query costs
    per_item = (middle - start) / len(texts) + (end - middle) / len(images)
    return {"texts": text_embs.float().numpy(), "images": image_class.float().numpy(),
            "image_embeddings": image_embs.float(), "seconds_per_item": per_item}


def _captions(net, image_embs: torch.Tensor, params: SamplingParams) -> list[list[int]]:
    with torch.inference_mode():
        return [g.tokens for g in generate(net, image_embs.to(net.dtype), params)]


def _batch_invariance(net, image_embs: torch.Tensor, together: list[list[int]], params: SamplingParams,
                      alone: int) -> float:
    """Share of the first `alone` images whose caption made alone equals `together`'s (made in the whole batch)."""
    together = together[:alone]
    return sum(_captions(net, image_embs[i : i + 1], params)[0] == tokens for i, tokens in enumerate(together)) / len(together)


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def top10_overlap(reference: dict, candidate: dict, calibration: Calibration, chunk: int = 16384) -> float:
    """Mean |top-10 of fp32 ∩ top-10 of the candidate| / 10 over the text and image queries (exact search)."""
    return overlap(index_top_k(reference, calibration, chunk), index_top_k(candidate, calibration, chunk))


def overlap(reference_ids: np.ndarray, candidate_ids: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(c)) / TOP_K for r, c in zip(reference_ids, candidate_ids)]))


def index_top_k(found: dict, calibration: Calibration, chunk: int = 16384) -> np.ndarray:
    """Each text and image query's TOP_K item ids on the index built from `found`'s own image embeddings:
    `index_size` fixed random mixtures of three calibration images each (the same mixtures whoever's
    embeddings), a chunk at a time (a 100k index never sits in memory whole)."""
    rng = np.random.default_rng(calibration.seed + 1)
    which = rng.integers(0, len(found["images"]), size=(calibration.index_size, 3))
    weights = rng.uniform(0.1, 1.0, size=(calibration.index_size, 3, 1)).astype(np.float32)
    queries = np.concatenate([found["texts"], found["images"]])
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return _top_k(queries, found["images"], which, weights, chunk)


def _top_k(queries: np.ndarray, images: np.ndarray, which: np.ndarray, weights: np.ndarray, chunk: int) -> np.ndarray:
    """Ids of each query's TOP_K best items; item i = the `which[i]` images mixed by `weights[i]`, normalised."""
    top_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    top_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(which), chunk):
        end = min(start + chunk, len(which))
        items = (images[which[start:end]] * weights[start:end]).sum(axis=1)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
        scores = np.concatenate([top_scores, queries @ items.T], axis=1)
        ids = np.concatenate([top_ids, np.broadcast_to(np.arange(start, end), (len(queries), end - start))], axis=1)
        keep = np.argpartition(-scores, min(TOP_K, scores.shape[1] - 1), axis=1)[:, :TOP_K]
        top_scores, top_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return top_ids  # as sets: the overlap ignores order


def _interleaved_best(nets: dict, rounds: int) -> dict[str, float]:
    """Each net's best batch-1 step time over `rounds`, the nets taking turns: load on a shared machine
    then falls on every candidate alike, and the best of each is the least disturbed."""
    best = {p: float("inf") for p in nets}
    for _ in range(rounds):
        for p, net in nets.items():
            best[p] = min(best[p], step_seconds(net, 1, steps=8))
    return best


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work before a clock is read (nothing on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def start_seconds(net, batch: int, repeats: int = 3) -> float:
    """Best time of starting `batch` captions at once: each image's cross-attention keys and values, the
    decoder's once-per-caption cost (the iterative scheduler pays it in the rounds where captions join)."""
    cache = net.new_cache(batch, 2)
    slots, device = slice(0, batch), net.device
    sync = _synchronizer(device)
    images = torch.randn(batch, cache.cross[0].k.shape[2], net.config.decoder.width, dtype=net.dtype, device=device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            net.start_sequences(cache, slots, images)
            sync()
            best = min(best, time.perf_counter() - start)
    return best


def step_seconds(net, batch: int, steps: int = 16) -> float:
    """Mean time of one cached decode step at batch `batch`, over positions 1..steps-1 (after a warm-up)."""
    cache = net.new_cache(batch, steps)
    slots, device = slice(0, batch), net.device
    sync = _synchronizer(device)
    with torch.inference_mode():
        net.start_sequences(cache, slots, torch.zeros(batch, cache.cross[0].k.shape[2], net.config.decoder.width,
                                                      dtype=net.dtype, device=device))
        tokens = torch.full((batch, 1), SOT, device=device)
        net.decode(tokens, torch.zeros(batch, dtype=torch.long, device=device), cache, slots)  # warm-up
        sync()
        start = time.perf_counter()
        for pos in range(1, steps):
            net.decode(tokens, torch.full((batch,), pos, device=device), cache, slots)
        sync()
    return (time.perf_counter() - start) / (steps - 1)
