"""Our per-row sampling filters against the transformers processors open_clip uses."""
import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

import coca
from coca.errors import InvalidInputError
from coca.generate import generate
from coca.sampling import SamplingParams, filter_top_k, filter_top_p, penalise_repeats


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 1000) * 3


@pytest.mark.parametrize("k", [1, 5, 100])
def test_top_k_equals_transformers(logits, k):
    expected = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(filter_top_k(logits, torch.full((3,), k)), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_equals_transformers(logits, p):
    expected = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(filter_top_p(logits, torch.full((3,), p, dtype=torch.float64)), expected)


def test_filters_mix_settings_per_row(logits):
    out = filter_top_k(logits, torch.tensor([1, 0, 7]))
    assert [(row > float("-inf")).sum().item() for row in out] == [1, 1000, 7]


def test_repetition_penalty_equals_transformers(logits):
    history = torch.tensor([[1, 2, 3], [4, 4, 5], [6, 7, 8]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(penalise_repeats(logits, history, torch.full((3,), 1.3)), expected)


@pytest.fixture(scope="module")
def tiny_embs(images):
    model = coca.load("coca-tiny", pretrained="random", seed=0)
    return model, model.encode_images(images[:2]).image_embeddings


def test_seed_makes_sampling_reproducible_and_batch_independent(tiny_embs):
    model, embs = tiny_embs
    params = SamplingParams(temperature=1.0, top_k=50, seed=7, max_tokens=10)
    first = [g.tokens for g in generate(model.net, embs, params)]
    assert first == [g.tokens for g in generate(model.net, embs, params)]
    assert first[1] == generate(model.net, embs[1:], params)[0].tokens  # alone = in a batch
    other = [g.tokens for g in generate(model.net, embs, SamplingParams(temperature=1.0, top_k=50, seed=8, max_tokens=10))]
    assert other != first


def test_top_k_one_sampling_is_greedy(tiny_embs):
    model, embs = tiny_embs
    sampled = generate(model.net, embs, SamplingParams(temperature=0.7, top_k=1, seed=1, max_tokens=10))
    greedy = generate(model.net, embs, SamplingParams(max_tokens=10))
    assert [g.tokens for g in sampled] == [g.tokens for g in greedy]


def test_logprobs_are_model_log_probabilities(tiny_embs):
    model, embs = tiny_embs
    out = generate(model.net, embs[:1], SamplingParams(max_tokens=6))[0]
    tokens = torch.tensor([[49406] + out.tokens[:-1]])
    logits = model.net.teacher_forced_logits(embs[:1], tokens)[0]
    expected = logits.log_softmax(-1).gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs[:-1]), expected[:-1], atol=1e-5)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 500}, "max_tokens"),
        ({"num_beams": 4, "num_beam_groups": 3}, "num_beams"),
        # bounds that keep every score finite and a beam search within a decoder's cache
        ({"repetition_penalty": 1e-30}, r"repetition_penalty must be in \[0.1, 10\]"),
        ({"repetition_penalty": 1e9}, r"repetition_penalty must be in \[0.1, 10\]"),
        ({"temperature": 1e-30}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\]"),
        ({"temperature": float("nan")}, "temperature"),
        ({"num_beams": 64}, r"num_beams must be in \[1, 16\]"),
        ({"min_tokens": 10**9}, r"min_tokens must be in \[0, 75\]"),
    ],
)
def test_bad_settings_say_what_is_wrong(settings, words):
    with pytest.raises(InvalidInputError, match=words):
        SamplingParams(**settings)


def test_float32_settings_are_read_as_written():
    """Protobuf and Triton carry floats as float32: 0.01 arrives as 0.009999999776, yet is the bound."""
    import numpy as np

    params = SamplingParams.from_float32({"temperature": float(np.float32(0.01)), "top_p": float(np.float32(0.9)),
                                          "top_k": 40, "repetition_penalty": float(np.float32(0.1))})
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.01, 0.9, 40, 0.1)


def test_settings_at_their_bounds_keep_every_score_finite(tiny_embs):
    """The extreme settings validation allows still sample (before: a penalty near 0 turned the
    seen tokens' logits into inf, softmax gave NaN, and torch.multinomial raised)."""
    model, embs = tiny_embs
    for settings in ({"repetition_penalty": 0.1}, {"repetition_penalty": 10.0}, {"temperature": 0.01},
                     {"temperature": 100.0}):
        params = SamplingParams(**{"temperature": 1.0, "top_k": 0, "seed": 3, "max_tokens": 10, **settings})
        out = generate(model.net, embs[:2], params)
        assert all(len(g.tokens) >= 1 and all(math.isfinite(lp) for lp in g.logprobs) for g in out)
