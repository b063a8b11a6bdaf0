"""The Decoder: captions at different positions, with different settings, in one batched forward."""
import pytest
import torch

import coca
from coca.decoding import Decoder
from coca.errors import CapacityError, GenerationError, InvalidInputError
from coca.generate import generate
from coca.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(images):
    model = coca.load("coca-tiny", pretrained="random", seed=0)
    return model, model.encode_images(images).image_embeddings


GREEDY = SamplingParams(max_tokens=12)
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=5, max_tokens=12)
BEAMS = SamplingParams(max_tokens=10, num_beams=6, num_beam_groups=3)


def test_staggered_sequences_equal_their_solo_captions(tiny):
    model, embs = tiny
    decoder = Decoder(model.net, capacity=8)
    running, rows_per_step = [], []
    for i in range(4):  # a new caption joins at every step: positions differ within each forward
        running += decoder.start(embs[i : i + 1], GREEDY)
        rows_per_step.append(decoder.step(running))
    while n := decoder.step(running):
        rows_per_step.append(n)
    assert max(rows_per_step) == 4  # four sequences in one forward
    assert [s.result().tokens for s in running] == [g.tokens for g in generate(model.net, embs, GREEDY)]


def test_mixed_settings_in_one_batch_equal_solo_runs(tiny):
    model, embs = tiny
    decoder = Decoder(model.net, capacity=16)
    sequences = decoder.start(embs[:1], GREEDY) + decoder.start(embs[1:2], SAMPLED) + decoder.start(embs[2:3], BEAMS)
    results = decoder.run(sequences)
    solo = [generate(model.net, embs[i : i + 1], p)[0].tokens for i, p in enumerate([GREEDY, SAMPLED, BEAMS])]
    assert [r.tokens for r in results] == solo
    assert sorted(decoder.pool.free) == list(range(16))  # every slot came back


def test_capacity_error_is_clear_and_leaves_pool_intact(tiny):
    model, embs = tiny
    decoder = Decoder(model.net, capacity=4)
    held = decoder.start(embs[:3], GREEDY)
    with pytest.raises(CapacityError, match="2 slot\\(s\\) wanted, 1 free"):
        decoder.start(embs[:2], GREEDY)
    assert len(decoder.pool.free) == 1
    for s in held:
        decoder.release(s)
    assert len(decoder.start(embs[:4], GREEDY)) == 4


def test_scattered_slots_read_the_right_cache_rows(tiny):
    model, embs = tiny
    decoder = Decoder(model.net, capacity=6)
    a = decoder.start(embs[:3], GREEDY)
    decoder.release(a[1])  # leaves a hole: the next caption lands between the others
    b = decoder.start(embs[3:4], GREEDY)
    assert b[0].rows == [1]
    results = decoder.run([a[0], b[0], a[2]])
    expected = generate(model.net, embs[[0, 3, 2]], GREEDY)
    assert [r.tokens for r in results] == [g.tokens for g in expected]


def out_of_range(embs: torch.Tensor) -> torch.Tensor:
    """Finite image embeddings (they pass every input check) whose logits come out NaN: +-1e20."""
    huge = torch.full_like(embs, 1e20)
    huge[..., ::2] = -1e20
    return huge


@pytest.mark.parametrize("params", [SAMPLED, GREEDY, BEAMS], ids=["sampled", "greedy", "beams"])
def test_a_caption_with_nan_scores_fails_alone(tiny, params):
    """Its neighbours in the same forwards finish with their solo tokens; before, a sampled row's NaN
    made torch.multinomial raise inside step() and every caption of the batch failed."""
    model, embs = tiny
    decoder = Decoder(model.net, capacity=16)
    good = decoder.start(embs[:2], GREEDY)
    bad = decoder.start(out_of_range(embs[2:3]), params)
    sequences = [good[0], bad[0], good[1]]
    while decoder.step(sequences):
        pass
    assert [s.result().tokens for s in good] == [g.tokens for g in generate(model.net, embs[:2], GREEDY)]
    with pytest.raises(GenerationError, match="NaN or infinite"):
        bad[0].result()
    for s in sequences:
        decoder.release(s)
    assert sorted(decoder.pool.free) == list(range(16))


def test_a_beam_search_that_can_never_fit_is_invalid_not_busy(tiny):
    model, embs = tiny
    decoder = Decoder(model.net, capacity=8)
    with pytest.raises(InvalidInputError, match=r"need 12 decoder cache rows, more than this decoder has in all \(8\)"):
        decoder.start(embs[:1], SamplingParams(num_beams=12, num_beam_groups=3))
    assert len(decoder.pool.free) == 8


def test_text_so_far_is_always_a_prefix_of_the_finished_caption():
    """Streamed text: each step's text extends the previous one and the finished caption starts with
    it, also when tokens end mid-character (a UTF-8 sequence split over byte tokens) or mid word-end
    mark ("<", "/", "w", ">" as single tokens); whole words are not held back."""
    import random

    import open_clip
    from coca.runtime import text_so_far, tokens_to_text

    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
    byte_token = {b: tokenizer.encoder[tokenizer.byte_encoder[b]] for b in range(256)}
    words = [tokenizer.encoder[w + "</w>"] for w in ("a", "cat", "on", "the", "mat")]
    awkward = [byte_token[b] for b in "é€😀".encode() + b"</w> \xff"]  # split characters, the mark, a bad byte
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.choice(words + awkward) for _ in range(rng.randint(1, 12))]
        final = tokens_to_text(tokenizer, tokens)
        shown = [text_so_far(tokenizer, tokens[:n]) for n in range(len(tokens) + 1)]
        for before, after in zip(shown, shown[1:]):
            assert after.startswith(before), (tokens, before, after)
        assert final.startswith(shown[-1]), (tokens, shown[-1], final)
    plain = [words[1], words[2], words[3], words[4]]
    assert [text_so_far(tokenizer, plain[:n]) for n in range(1, 5)] == \
        [tokens_to_text(tokenizer, plain[:n]) for n in range(1, 5)] == ["cat", "cat on", "cat on the", "cat on the mat"]
    split = [byte_token[b] for b in "😀".encode()]  # four byte tokens, one character
    assert [text_so_far(tokenizer, split[:n]) for n in range(1, 5)] == ["", "", "", "😀"]
