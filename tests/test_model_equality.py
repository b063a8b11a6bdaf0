"""Our CoCa against open_clip 3.3 itself, on the same random-initialised weights.

Tolerances: ClassEmbeddings 1e-5 relative (max abs diff / max abs value),
decoder logits 1e-4 absolute, captions token-identical.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import coca
from coca.generate import generate, generate_uncached
from coca.sampling import EOT, SamplingParams

MODELS = ["coca-tiny", "coca_ViT-B-32"]
DEVICE = os.environ.get("COCA_TEST_DEVICE", "cpu")  # "cuda" on a GPU machine: the same checks there


def make_pair(name, seed=0):
    """(open_clip reference, our runtime) sharing one set of weights, on DEVICE."""
    reference = coca.create_open_clip(name, "random", seed=seed).to(DEVICE)
    return reference, coca.from_reference(name, "random", reference, device=DEVICE)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    return make_pair(request.param)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_image_class_embeddings_equal_open_clip(pair, images):
    reference, model = pair
    pixels = model.pixels(images)
    with torch.no_grad():
        ref_latent, ref_tokens = reference._encode_image(pixels)
    ours = model.encode_images(images)
    assert ours.class_embedding.shape == ref_latent.shape
    assert rel_err(ours.class_embedding, ref_latent) < 1e-5
    assert ours.image_embeddings.shape == (len(images), 255, reference.text_decoder.ln_final.weight.shape[0])
    assert rel_err(ours.image_embeddings, ref_tokens) < 1e-5


TEXTS = [
    "a dog",
    "A portrait of a woman with red hair taking a picture with an analog camera",
    "wow ! a token that is open_clip's pad id inside the text",
    "long " * 100,  # truncated to the 76-token context
]


def test_text_class_embeddings_equal_open_clip_on_real_length(pair):
    reference, model = pair
    tokens = model.tokenize(TEXTS).to(DEVICE)
    assert (tokens[2] == 0).sum() > (tokens[0] == 0).sum() - 76  # sanity: "!" is token 0
    with torch.no_grad():
        ref = reference.encode_text(tokens)
    ours = model.encode_texts(TEXTS)
    assert rel_err(ours.class_embedding, ref) < 1e-5
    single = model.encode_texts(TEXTS[:1]).class_embedding  # alone: computed over 4 tokens, not 77
    assert rel_err(single, ref[:1]) < 1e-5


def test_teacher_forced_logits_equal_open_clip(pair, images):
    reference, model = pair
    captions = ["a photo of a cat on a red sofa", "two dogs run on the beach at sunset"]
    tokens = model.tokenize(captions).to(DEVICE)
    pixels = model.pixels(images[:2])
    with torch.no_grad():
        ref = reference(pixels, tokens)["logits"]  # (B, 75, V): predicts tokens[1:]
    real = int((tokens != 0).sum(1).min()) - 1  # positions before the first pad in every row
    ours = model.net.teacher_forced_logits(model.encode_images(images[:2]).image_embeddings, tokens[:, :real])
    assert ours.shape == (2, real, ref.shape[-1])
    assert float((ours - ref[:, :real]).abs().max()) < 1e-4


def open_clip_greedy(reference, pixels, max_tokens, min_tokens=4):
    with torch.no_grad():
        out = reference.generate(
            pixels, generation_type="top_k", top_k=1, seq_len=max_tokens + 1, min_seq_len=min_tokens + 1
        )
    return [[t for t in row[1:] if t != 0] for row in out.tolist()]  # drop SOT and trailing pads


def test_greedy_captions_identical_to_open_clip(pair, images):
    reference, model = pair
    params = SamplingParams(max_tokens=12)
    expected = open_clip_greedy(reference, model.pixels(images), 12)
    embs = model.encode_images(images).image_embeddings
    cached = [g.tokens for g in generate(model.net, embs, params)]
    uncached = [g.tokens for g in generate_uncached(model.net, embs, params)]
    assert cached == expected
    assert uncached == expected


def test_batch_ending_at_different_steps(images):
    """Make EOS win where a common token would, so captions of one batch end at different steps."""
    reference, model = make_pair("coca-tiny")
    pixels = model.pixels(images)
    first = open_clip_greedy(reference, pixels, 16)
    with torch.no_grad():  # shared storage: this edits both models' weights
        projection = reference.text_decoder.text_projection
        projection[:, EOT] = projection[:, first[0][5]] * 1.5
    expected = open_clip_greedy(reference, pixels, 16)
    assert len({len(row) for row in expected}) > 1, "precondition: rows end at different steps"
    assert any(row[-1] == EOT and len(row) < 16 for row in expected)
    embs = model.encode_images(images).image_embeddings
    assert [g.tokens for g in generate(model.net, embs, SamplingParams(max_tokens=16))] == expected
    assert [g.tokens for g in generate_uncached(model.net, embs, SamplingParams(max_tokens=16))] == expected


def test_beam_search_identical_to_open_clip(images):
    reference, model = make_pair("coca-tiny")
    with torch.no_grad():
        expected = reference.generate(model.pixels(images[:2]), generation_type="beam_search", seq_len=11)
    params = SamplingParams(max_tokens=10, num_beams=6, num_beam_groups=3)
    ours = generate(model.net, model.encode_images(images[:2]).image_embeddings, params)
    assert [g.tokens for g in ours] == [[t for t in row[1:] if t != 0] for row in expected.tolist()]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_gives_same_outputs(tmp_path, images, suffix):
    from safetensors.torch import save_file

    reference = coca.create_open_clip("coca-tiny", "random", seed=3)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    from_memory = coca.from_reference("coca-tiny", "random", reference)
    from_file = coca.load("coca-tiny", pretrained=str(path))
    a, b = from_memory.encode_images(images[:2]), from_file.encode_images(images[:2])
    assert torch.equal(a.class_embedding, b.class_embedding)
    assert np.array_equal(from_memory.embed_texts(["a dog"]), from_file.embed_texts(["a dog"]))
    params = SamplingParams(max_tokens=8)
    assert [c.tokens for c in from_memory.caption(images[:2], params)] == [
        c.tokens for c in from_file.caption(images[:2], params)
    ]


def test_preprocessing_is_open_clip_s(pair, images):
    import open_clip

    reference, model = pair
    _, _, preprocess = open_clip.create_model_and_transforms(model.model_name, pretrained=None)
    img = Image.open(images[0]).convert("RGB")
    assert torch.equal(model.pixels([images[0]])[0].cpu(), preprocess(img))


def test_image_attention_equals_multihead_attention_weights(pair, images):
    """The last ViT block's per-head weights, against torch's own MultiheadAttention."""
    reference, model = pair
    block = reference.visual.transformer.resblocks[-1]
    seen = {}
    block.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    pixels = model.pixels(images[:2])
    with torch.no_grad():
        reference.encode_image(pixels)
        y = block.ln_1(seen["x"])
        _, expected = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    ours = model.encode_images(images[:2], want_attention=True).attention
    grid = model.net.visual.grid
    assert ours.shape == (2, block.attn.num_heads, grid * grid + 1, grid * grid + 1)
    assert float((ours - expected).abs().max()) < 1e-5


def test_video_caption_uses_mean_of_frames(tmp_path):
    from coca import media

    reference, model = make_pair("coca-tiny")
    video = make_video(tmp_path / "clip.mp4")
    frames = media.video_frames(str(video), 4)
    enc = model.encode_images(frames)
    params = SamplingParams(max_tokens=8)
    expected = generate(model.net, enc.image_embeddings.mean(0, keepdim=True), params)[0].tokens
    assert model.caption_video(str(video), frames=4, params=params).tokens == expected
    pooled = model.encode_video(str(video), frames=4).class_embedding
    assert torch.allclose(pooled[0], torch.nn.functional.normalize(enc.class_embedding.mean(0), dim=0), atol=1e-6)


def make_video(path, count=12):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(count):
            array = np.full((48, 64, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
