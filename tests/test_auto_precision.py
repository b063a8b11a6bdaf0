"""`coca export --precision auto` (coca/precision.py): candidates from the CPU's features, gates against fp32.

The CPU features are injected (never this machine's), so every test runs on an AVX2-only box as on
an AVX-512/VNNI one; the models are coca-tiny with random weights and a small index.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from clients.cli import main
from coca.cpu import parse_flags
from coca.generate import generate
from coca.precision import (GATES, Calibration, calibration_set, candidates, choose_precision,
                            quantized_decoder, summary)
from coca.sampling import SamplingParams
from serving.protocol import TRITON_MODELS, Identity
from serving.repository import (MANIFEST_FILE, DecoderSettings, EncoderSettings, auto_precision, config_parameters,
                                export_repository)

AVX2 = frozenset({"avx2", "fma"})
VNNI = frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})
SMALL = Calibration(images=8, texts=16, index_size=3000, max_tokens=8)
CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 sha_ni
processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 sha_ni
"""


def test_cpu_features_are_read_from_the_kernels_flags():
    assert parse_flags(CPUINFO) == ("AMD EPYC 9654 96-Core Processor",
                                    frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}))
    assert parse_flags("flags\t: fpu sse2 avx2 fma\n") == ("", AVX2)


def test_candidates_follow_the_cpu():
    only_fp32, skipped = candidates(AVX2, "onnxruntime")
    assert [(c.encoders, c.decoder) for c in only_fp32] == [("fp32", "fp32")]
    assert "no VNNI" in skipped["int8"] and "no AVX512-BF16" in skipped["bf16"]
    with_vnni, skipped = candidates(VNNI, "onnxruntime")
    assert [(c.encoders, c.decoder) for c in with_vnni] == [("fp32", "fp32"), ("fp32", "int8"), ("int8", "fp32"),
                                                             ("int8", "int8")]
    assert "no AVX512-BF16" in skipped["bf16"]
    with_bf16, skipped = candidates(VNNI | {"avx512_bf16"}, "onnxruntime")
    assert [(c.encoders, c.decoder) for c in with_bf16] == [(e, d) for e in ("fp32", "int8") for d in ("fp32", "int8", "bf16")]
    assert "bf16" not in skipped and "no bf16 MatMul" in skipped["bf16 encoders"]
    amx_only, _ = candidates(AVX2 | {"amx_bf16"}, "torch")
    assert [(c.encoders, c.decoder) for c in amx_only] == [("fp32", "fp32"), ("fp32", "bf16")]
    torch_encoders, skipped = candidates(VNNI, "torch")
    assert {c.encoders for c in torch_encoders} == {"fp32"} and "onnxruntime" in skipped["int8 encoders"]


def noisy_decoder(model, precision):
    """A decoder that is wrong on purpose: the vocabulary projection disturbed (a broken int8, say)."""
    net = copy.deepcopy(model.net)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        projection = net.text_decoder.text_projection
        projection.add_(torch.randn(projection.shape, generator=generator) * projection.std() * 3)
    return net


def test_a_candidate_failing_a_gate_is_not_chosen_and_its_figures_are_recorded(tiny_coca):
    record = choose_precision(tiny_coca, VNNI, "torch", SMALL, decoder_twin=noisy_decoder)
    rows = {(r["encoders"], r["decoder"]): r for r in record["candidates"]}
    broken = rows[("fp32", "int8")]
    # oracle: the captions of fp32 and of the broken decoder, made here from the same calibration images
    images, _ = calibration_set(SMALL)
    params = SamplingParams(max_tokens=SMALL.max_tokens)
    with torch.inference_mode():
        embs = tiny_coca.encode_images(images).image_embeddings
        expected = [g.tokens for g in generate(tiny_coca.net, embs, params)]
        got = [g.tokens for g in generate(noisy_decoder(tiny_coca, "int8"), embs, params)]
    equal = sum(a == b for a, b in zip(got, expected)) / len(expected)
    assert equal < GATES["captions_equal"]
    assert broken["captions_equal"] == pytest.approx(equal)
    assert broken["failed"] == ["captions_equal"] and not broken["passed"]
    # the encoders are fp32 in both: their gates are exactly met
    assert (broken["text_cosine"], broken["image_cosine"], broken["top10_overlap"]) == pytest.approx((1, 1, 1), abs=1e-5)
    assert record["chosen"] == {"encoders": "fp32", "decoder": "fp32"}
    assert record["features"] == sorted(VNNI) and record["gates"] == GATES
    assert all(r["step_ms"] > 0 and r["cost_ms"] > 0 for r in record["candidates"])


def test_a_faithful_candidate_passes_and_the_fastest_passing_one_is_kept(tiny_coca):
    same = lambda model, precision: copy.deepcopy(model.net)  # noqa: E731 -- "int8" that computes fp32 exactly
    record = choose_precision(tiny_coca, VNNI, "torch", SMALL, decoder_twin=same)
    rows = record["candidates"]
    assert all(r["passed"] and r["captions_equal"] == 1.0 for r in rows)
    fastest = min(rows, key=lambda r: r["cost_ms"])
    assert record["chosen"] == {"encoders": fastest["encoders"], "decoder": fastest["decoder"]}


class BatchDependentVocabulary(torch.nn.Module):
    """The vocabulary projection of a kernel that takes another path for a batch than for one row
    (as a machine's bf16 kernels may): rows computed in a batch are disturbed, a row alone is not."""

    def __init__(self, projection: torch.Tensor):
        super().__init__()
        self.projection = projection.detach().clone()
        self.noise = torch.randn(projection.shape[1], generator=torch.Generator().manual_seed(2)) * projection.std() * 40

    def forward(self, x):
        return x @ self.projection + (self.noise if x.shape[0] > 1 else 0)


def batch_dependent_decoder(model, precision):
    net = copy.deepcopy(model.net)
    net.text_decoder.vocab_kernel = BatchDependentVocabulary(net.text_decoder.text_projection)
    return net


def test_bf16_is_measured_where_the_cpu_has_it_and_a_batch_dependent_decoder_is_refused(tiny_coca):
    bf16_cpu = AVX2 | {"avx512_bf16"}
    record = choose_precision(tiny_coca, bf16_cpu, "torch", SMALL)  # the real bf16 decoder (coca/quant.py)
    row = next(r for r in record["candidates"] if r["decoder"] == "bf16")
    images, _ = calibration_set(SMALL)
    params = SamplingParams(max_tokens=SMALL.max_tokens)
    with torch.inference_mode():  # oracle: fp32's and bf16's captions, made here
        embs = tiny_coca.encode_images(images).image_embeddings
        expected = [g.tokens for g in generate(tiny_coca.net, embs, params)]
        got = [g.tokens for g in generate(quantized_decoder(tiny_coca, "bf16"), embs, params)]
    assert row["captions_equal"] == pytest.approx(sum(a == b for a, b in zip(got, expected)) / len(expected))
    assert row["batch_invariant"] == 1.0 and "batch_invariant" not in row["failed"]
    assert row["passed"] == (row["captions_equal"] >= GATES["captions_equal"])

    record = choose_precision(tiny_coca, bf16_cpu, "torch", SMALL, decoder_twin=batch_dependent_decoder)
    row = next(r for r in record["candidates"] if r["decoder"] == "bf16")
    broken = batch_dependent_decoder(tiny_coca, "bf16")
    with torch.inference_mode():  # oracle: how many of the first `alone` captions a batch changes
        together = [g.tokens for g in generate(broken, embs, params)][: SMALL.alone]
        alone = [generate(broken, embs[i : i + 1], params)[0].tokens for i in range(SMALL.alone)]
    invariant = sum(a == b for a, b in zip(together, alone)) / SMALL.alone
    assert invariant < 1 and row["batch_invariant"] == pytest.approx(invariant)
    assert "batch_invariant" in row["failed"] and record["chosen"] == {"encoders": "fp32", "decoder": "fp32"}


@pytest.mark.long  # four ONNX exports: ~20 s
def test_int8_encoders_are_measured_against_fp32_embeddings(tiny_coca, tmp_path):
    """ONNX int8 encoders: the recorded cosines are the worst item's, computed here again from the graphs."""
    from coca.precision import encode_calibration

    record = choose_precision(tiny_coca, VNNI, "onnxruntime", SMALL)
    row = next(r for r in record["candidates"] if (r["encoders"], r["decoder"]) == ("int8", "fp32"))
    images, texts = calibration_set(SMALL)
    fp32, int8 = (encode_calibration(tiny_coca, "onnxruntime", p, images, texts, str(tmp_path)) for p in ("fp32", "int8"))
    for kind, figure in (("texts", "text_cosine"), ("images", "image_cosine")):
        a, b = fp32[kind], int8[kind]
        worst = ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()
        assert row[figure] == pytest.approx(worst, abs=1e-5) and worst < 1  # int8 really differs
    gates = {"text_cosine": GATES["embedding_cosine"], "image_cosine": GATES["embedding_cosine"],
             "top10_overlap": GATES["top10_overlap"], "captions_equal": GATES["captions_equal"],
             "batch_invariant": GATES["batch_invariant"]}
    assert row["failed"] == [name for name, bound in gates.items() if row[name] < bound]


def test_on_a_cpu_without_vnni_auto_exports_fp32_at_no_cost(tiny_coca, tmp_path):
    encoders, decoder, record = auto_precision(tiny_coca, EncoderSettings(), DecoderSettings(), features=AVX2)
    assert (encoders.precision, decoder.precision) == ("fp32", "fp32")
    manifest = json.loads(export_repository(tiny_coca, tmp_path, encoders=encoders, decoder=decoder,
                                            precision=record).read_text())
    assert manifest["precision"] == record and record["mode"] == "auto"
    expected = "encoders fp32, decoder fp32 (auto)"
    for name in TRITON_MODELS:  # what a client (and so Stats and /metrics) reads: every model's config
        params = config_parameters((tmp_path / name / "config.pbtxt").read_text())
        assert Identity.from_parameters(params).precision == expected == summary(record)


def test_an_int8_choice_is_written_into_the_configs_and_shown_by_coca_info(tiny_coca, tmp_path, capsys):
    same = lambda model, precision: copy.deepcopy(model.net)  # noqa: E731
    record = choose_precision(tiny_coca, VNNI, "torch", SMALL, decoder_twin=same)
    record["chosen"] = {"encoders": "fp32", "decoder": "int8"}  # as if int8 had been the fastest
    export_repository(tiny_coca, tmp_path, decoder=DecoderSettings(precision="int8"), precision=record)
    assert config_parameters((tmp_path / "coca_text_decoder" / "config.pbtxt").read_text())["precision"] == "int8"
    assert main(["info", "--repository", str(tmp_path)]) in (0, None)
    shown = capsys.readouterr().out
    assert "precision: encoders fp32, decoder int8 (auto)" in shown
    for row in record["candidates"]:
        verdict = "passed" if row["passed"] else "failed " + ", ".join(row["failed"])
        assert f"encoders {row['encoders']}, decoder {row['decoder']}: {verdict}" in shown
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["precision"]["candidates"] == record["candidates"]


def test_export_refuses_auto_with_a_named_precision(tmp_path, capsys):
    code = main(["export", "--model", "coca-tiny", "--pretrained", "random", "--out", str(tmp_path),
                 "--precision", "auto", "--decoder-precision", "int8"])
    assert code == 2 and "--precision auto chooses" in capsys.readouterr().err


def test_identity_equality_ignores_the_precision():
    a = Identity("m", "p", "float32", 64, "id", "encoders fp32, decoder fp32 (fixed)")
    assert a == Identity("m", "p", "float32", 64, "id", "encoders int8, decoder fp32 (auto)")
    assert Identity.from_parameters({k: v for k, v in a.parameters().items() if k != "coca_precision"}).precision == ""


def test_the_top10_gate_sees_a_disturbed_index(tiny_coca):
    """Equal embeddings overlap fully, disturbed ones do not; a chunked search equals one over the whole index."""
    from coca.precision import top10_overlap

    rng = np.random.default_rng(3)
    reference = {"texts": rng.normal(size=(12, 16)).astype(np.float32), "images": rng.normal(size=(6, 16)).astype(np.float32)}
    exact = {k: v.copy() for k, v in reference.items()}
    assert top10_overlap(reference, exact, Calibration(index_size=500), chunk=64) == 1.0
    noisy = {k: v + rng.normal(scale=0.5, size=v.shape).astype(np.float32) for k, v in reference.items()}
    overlap = top10_overlap(reference, noisy, Calibration(index_size=500), chunk=64)
    assert overlap < 0.98
    assert top10_overlap(reference, noisy, Calibration(index_size=500), chunk=500) == overlap


def test_export_chooses_automatically_unless_a_precision_is_named(tmp_path):
    """The CLI default: auto (features given, so it costs nothing on any machine); a named precision: fixed."""
    base = ["export", "--model", "coca-tiny", "--pretrained", "random"]
    assert main([*base, "--out", str(tmp_path / "auto"), "--cpu-features", "avx2,fma"]) == 0
    record = json.loads((tmp_path / "auto" / MANIFEST_FILE).read_text())["precision"]
    assert (record["mode"], record["features"], record["chosen"]) == ("auto", ["avx2", "fma"],
                                                                      {"encoders": "fp32", "decoder": "fp32"})
    assert main([*base, "--out", str(tmp_path / "named"), "--decoder-precision", "int8"]) == 0
    record = json.loads((tmp_path / "named" / MANIFEST_FILE).read_text())["precision"]
    assert record == {"mode": "fixed", "chosen": {"encoders": "fp32", "decoder": "int8"}}
