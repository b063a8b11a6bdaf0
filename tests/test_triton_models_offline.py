"""The Triton model classes run in this process through a stand-in for triton_python_backend_utils.

Fast (no server), and the way to check them on a GPU: with COCA_TEST_DEVICE=cuda the models get
`device: cuda` and must match the in-process CPU runtime (tests/test_triton.py runs them in
a real tritonserver on the CPU).
"""
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from serving.protocol import TRITON_MODELS
from serving.repository import config_parameters, export_repository
from coca.sampling import SamplingParams
from serving.protocol import SAMPLING_INPUTS

DEVICE = os.environ.get("COCA_TEST_DEVICE", "cpu")
TOLERANCE = 1e-5 if DEVICE == "cpu" else 2e-3  # cuDNN convolutions use TF32 by default
START, END = 1, 2


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = "UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class Request:
    def __init__(self, inputs: dict, outputs: list, correlation_id=0, flags=0):
        self.inputs = {name: Tensor(name, array) for name, array in inputs.items()}
        self.outputs, self.id, self.bits = outputs, correlation_id, flags

    def requested_output_names(self):
        return self.outputs

    def correlation_id(self):
        return self.id

    def flags(self):
        return self.bits


@pytest.fixture(scope="module", autouse=True)
def fake_pb_utils():
    module = types.ModuleType("triton_python_backend_utils")
    module.TritonError, module.Tensor, module.InferenceResponse = TritonError, Tensor, InferenceResponse
    module.Logger = types.SimpleNamespace(log_info=lambda m: None, log_error=print, log_warn=print)
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    sys.modules["triton_python_backend_utils"] = module
    yield
    del sys.modules["triton_python_backend_utils"]


@pytest.fixture(scope="module")
def models(tiny_coca, tmp_path_factory):
    """The three models, initialised as Triton would (args from the exported config.pbtxt)."""
    from serving.models import entry_point

    repo = tmp_path_factory.mktemp("repo")
    export_repository(tiny_coca, repo)
    loaded = {}
    for name, part in TRITON_MODELS.items():
        parameters = config_parameters((repo / name / "config.pbtxt").read_text())
        parameters["device"] = DEVICE
        config = {"name": name, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
        cls = "".join(w.title() for w in part.split("_")) + "Model"
        model = entry_point(f"serving.models.{part}", cls)()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name), "model_version": "1"})
        loaded[name] = model
    yield loaded
    for model in loaded.values():
        model.finalize()


def photos(paths):
    return np.array([[Path(p).read_bytes()] for p in paths], dtype=np.object_)


def test_image_encoder(models, tiny_coca, images):
    wanted = ["CLASS_EMBEDDING", "IMAGE_EMBEDDINGS", "ATTENTION"]
    good, bad = models["coca_image_encoder"].execute([
        Request({"IMAGE": photos(images)}, wanted), Request({"IMAGE": np.array([[b"not an image"]], np.object_)}, wanted)])
    expected = tiny_coca.encode_images(images, want_attention=True)
    for name, tensor in zip(wanted, [expected.class_embedding, expected.image_embeddings, expected.attention]):
        np.testing.assert_allclose(good.outputs[name], tensor.numpy(), atol=TOLERANCE, rtol=0)
    assert bad.error.code == TritonError.INVALID_ARG and "image" in str(bad.error)


def test_text_encoder(models, tiny_coca):
    texts = np.array([[b"a dog"], [b"a photo of a cat"]], dtype=np.object_)
    plain, detailed, empty = models["coca_text_encoder"].execute([
        Request({"TEXT": texts}, ["CLASS_EMBEDDING"]), Request({"TEXT": texts[1:]}, ["ATTENTION", "TOKENS"]),
        Request({"TEXT": np.array([[b""]], np.object_)}, ["CLASS_EMBEDDING"])])
    np.testing.assert_allclose(plain.outputs["CLASS_EMBEDDING"], tiny_coca.embed_texts(["a dog", "a photo of a cat"]),
                               atol=TOLERANCE, rtol=0)
    expected = tiny_coca.encode_texts(["a photo of a cat"], want_attention=True)
    np.testing.assert_allclose(detailed.outputs["ATTENTION"], expected.attention[-1].numpy(), atol=TOLERANCE, rtol=0)
    assert detailed.outputs["TOKENS"].tolist() == expected.kept_tokens.tolist()
    assert empty.error.code == TritonError.INVALID_ARG and "empty" in str(empty.error)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12), SamplingParams(max_tokens=8, num_beams=4, num_beam_groups=2)],
                         ids=["greedy", "beams"])
def test_text_decoder_runs_captions_to_done(models, tiny_coca, images, params):
    decoder = models["coca_text_decoder"]
    embeddings = tiny_coca.encode_images(images[:2]).image_embeddings.numpy()
    outputs = ["TOKEN", "DONE", "TOKENS", "BATCH_ROWS", "STATS", "TEXT_SO_FAR"]
    start = {name: np.array([[value]], dtype) for field, (name, dtype) in SAMPLING_INPUTS.items()
             if (value := getattr(params, field)) is not None}
    requests = [Request({**start, "IMAGE_EMBEDDINGS": embeddings[i : i + 1]}, outputs, 100 + i, START) for i in range(2)]
    rows, texts = [], []
    while True:
        responses = decoder.execute(requests)
        assert all(r.error is None for r in responses), [r.error for r in responses]
        rows.append(int(responses[0].outputs["BATCH_ROWS"][0, 0]))
        texts.append([r.outputs["TEXT_SO_FAR"][0, 0].decode() for r in responses])
        for response, text in zip(responses, texts[-1]):  # each step: the text of its tokens that cannot change
            tokens = response.outputs["TOKENS"][0].tolist()
            done = response.outputs["DONE"][0, 0]
            assert text == (tiny_coca.decode_text(tokens) if done else tiny_coca.text_so_far(tokens))
        if all(r.outputs["DONE"][0, 0] for r in responses):
            break
        requests = [Request({}, outputs, 100 + i) for i in range(2)]
    tokens = [r.outputs["TOKENS"][0].tolist() for r in responses]
    captions = tiny_coca.caption(images[:2], params)
    assert tokens == [c.tokens for c in captions]
    assert texts[-1] == [c.text for c in captions]
    assert all(after.startswith(before) for steps in zip(texts, texts[1:]) for before, after in zip(*steps))
    assert max(rows) == 2 * params.num_beams  # both captions in one forward
    ended = decoder.execute([Request({}, outputs, 100 + i, END) for i in range(2)])
    stats = json.loads(ended[-1].outputs["STATS"][0, 0])
    assert (stats["live_sequences"], stats["free_rows"]) == (0, stats["capacity_rows"])


def test_text_encoder_bounds_text_length_and_the_tokenizer_cache(models, tiny_coca, monkeypatch):
    """Neither a long text nor a stream of new words grows the model's memory: a text over the bound
    fails alone, and the tokenizer's word cache starts afresh past its bound (tokens still open_clip's)."""
    import open_clip

    from coca import runtime
    from coca.texts import MAX_TEXT_CHARS

    encoder = models["coca_text_encoder"]
    long = np.array([[b"w" * (MAX_TEXT_CHARS + 1)]], dtype=np.object_)
    good, refused = encoder.execute([Request({"TEXT": np.array([[b"a dog"]], np.object_)}, ["CLASS_EMBEDDING"]),
                                     Request({"TEXT": long}, ["CLASS_EMBEDDING"])])
    assert refused.error.code == TritonError.INVALID_ARG and f"over the limit of {MAX_TEXT_CHARS}" in str(refused.error)
    np.testing.assert_allclose(good.outputs["CLASS_EMBEDDING"], tiny_coca.embed_texts(["a dog"]), atol=TOLERANCE, rtol=0)

    monkeypatch.setattr(runtime, "MAX_TOKENIZER_CACHE_WORDS", 50)
    words = [f"w{''.join(chr(97 + (i // 26 ** k) % 26) for k in range(4))}" for i in range(600)]
    texts = [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]
    reference = open_clip.get_tokenizer(tiny_coca.model_name)
    sizes = []
    for text in texts:
        response = encoder.execute([Request({"TEXT": np.array([[text.encode()]], np.object_)}, ["TOKENS", "ATTENTION"])])[0]
        assert response.error is None
        assert response.outputs["TOKENS"].tolist() == tiny_coca.net.text(reference([text]), True).kept_tokens.tolist()
        sizes.append(len(encoder.model.coca.tokenizer.cache))
    assert max(sizes) <= 50 + 6 + 2, max(sizes)  # the bound, one text's words, the special tokens
