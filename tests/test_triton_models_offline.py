"""The Triton model classes run in this process through a stand-in for triton_python_backend_utils.

Fast (no server), and the way to check them on a GPU: with COCA_TEST_DEVICE=cuda the models get
`device: cuda` and must match the in-process CPU runtime (tests/test_triton.py runs them in
a real tritonserver on the CPU).
"""
import json
import os
import sys
import threading
import time
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


class CollectedCaption:
    """A caption's listener for the scheduler: what it was told; `cancel_after` steps it gives up."""

    def __init__(self, cancel_after: int = 0, cancelled_now: bool = False):
        self.steps, self.error, self.cancel_after = [], None, cancel_after
        self.gave_up = threading.Event()
        if cancelled_now:
            self.gave_up.set()
        self.ended = threading.Event()
        self.last_words = []  # "done", "fail" or "end": each caption must get exactly one (the FINAL flag)

    def cancelled(self) -> bool:
        if self.cancel_after and len(self.steps) >= self.cancel_after:
            self.gave_up.set()
        return self.gave_up.is_set()

    def end(self):
        self.last_words.append("end")
        self.ended.set()

    def step(self, step):
        self.steps.append(step)
        if step.done:
            self.last_words.append("done")
            self.ended.set()

    def fail(self, message: str, code: str):
        self.error = (message, code)
        self.last_words.append("fail")
        self.ended.set()


def test_the_caption_scheduler_steps_every_live_caption_in_each_forward(tiny_coca, images):
    """10 captions (greedy, seeded sampling, beams) on 8 cache rows: the two that do not fit wait and
    join when rows free up; each equals in-process generation, every forward advances every live caption,
    a caption that gives up leaves and frees its row, and a full queue is refused with the capacity message."""
    from coca.decoding import Decoder
    from coca.errors import CapacityError
    from serving.models.scheduler import CaptionScheduler

    settings = [SamplingParams(max_tokens=12), SamplingParams(temperature=0.75, top_k=40, top_p=0.5, seed=5, max_tokens=12),
                SamplingParams(max_tokens=8, num_beams=2, num_beam_groups=1)]
    chosen = [settings[i % 3] for i in range(10)]
    embeddings = tiny_coca.encode_images(images).image_embeddings
    scheduler = CaptionScheduler(Decoder(tiny_coca.net, capacity=8), max_waiting=11)
    captions = [CollectedCaption() for _ in chosen]
    quitter = CollectedCaption(cancel_after=2)
    try:
        for i, (params, caption) in enumerate(zip(chosen, captions)):
            scheduler.submit(embeddings[i % 4][None], params, caption)
        scheduler.submit(embeddings[0][None], SamplingParams(max_tokens=70, min_tokens=70), quitter)
        with pytest.raises(CapacityError, match="decoder cache full"):  # at most 11 wait for rows
            for _ in range(30):
                scheduler.submit(embeddings[0][None], settings[0], CollectedCaption())
        assert all(c.ended.wait(120) for c in [*captions, quitter])
        time.sleep(0.2)  # the refused-burst captions that did get in finish too
        stats = scheduler.stats()
    finally:
        scheduler.stop()
    for i, (params, caption) in enumerate(zip(chosen, captions)):
        assert caption.error is None, caption.error
        assert caption.steps[-1].tokens == tiny_coca.caption([images[i % 4]], params)[0].tokens, f"caption {i}"
        if params.num_beams == 1:  # a sampled caption streams its tokens one per step (+ a forced EOS)
            final = caption.steps[-1].tokens
            assert [s.tokens for s in caption.steps[:-1]] == [final[: n + 1] for n in range(len(caption.steps) - 1)]
    assert quitter.error is None and not quitter.steps[-1].done and len(quitter.steps) == 2
    assert max(s.batch_rows for c in captions for s in c.steps) == 8  # the cache full: every row in one forward
    assert (stats["free_rows"], stats["live_sequences"], stats["waiting_sequences"]) == (8, 0, 0)
    assert stats["cancelled"] == 1 and stats["refused"] >= 1 and stats["rows"] / stats["forwards"] > 4


def test_a_cancelled_caption_still_ends_its_stream(tiny_coca, images):
    """python_backend releases a decoupled request only on a response with the FINAL flag: a caption
    cancelled while decoding, or while waiting for cache rows, is told `end` (the captioner sends FINAL),
    once; the others get their done step or error, once. (Before: cancelled captions left without a word.)"""
    from coca.decoding import Decoder
    from serving.models.captioner import ResponseListener
    from serving.models.scheduler import CaptionScheduler

    embeddings = tiny_coca.encode_images(images[:1]).image_embeddings
    long = SamplingParams(max_tokens=40, min_tokens=40)
    scheduler = CaptionScheduler(Decoder(tiny_coca.net, capacity=1), max_waiting=4)
    decoding, waiting, after = CollectedCaption(cancel_after=3), CollectedCaption(cancelled_now=True), CollectedCaption()
    try:
        scheduler.submit(embeddings, long, decoding)  # holds the only row until it gives up
        scheduler.submit(embeddings, long, waiting)  # gives up before a row frees
        scheduler.submit(embeddings, SamplingParams(max_tokens=4), after)
        assert all(c.ended.wait(120) for c in (decoding, waiting, after))
        time.sleep(0.2)
        stats = scheduler.stats()
    finally:
        scheduler.stop()
    assert (decoding.last_words, waiting.last_words, after.last_words) == (["end"], ["end"], ["done"])
    assert len(decoding.steps) == 3 and waiting.steps == [] and stats["cancelled"] == 2 and stats["free_rows"] == 1

    class Sender:
        sent = []

        def send(self, response=None, flags=0):
            self.sent.append((response, flags))

    class Model:
        final = 2  # TRITONSERVER_RESPONSE_COMPLETE_FINAL

    sender = Sender()
    ResponseListener(Model(), None, sender, set()).end()
    assert sender.sent == [(None, 2)]
