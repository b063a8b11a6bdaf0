"""coca.plots renders real PNGs; checks they decode, have a plausible size and content."""

import numpy as np
import pytest
from PIL import Image

from coca.plots import (
    center_crop,
    embed_2d,
    feature_space_png,
    image_attention_png,
    text_attention_png,
    tsne_perplexity,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width, min_height):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.width >= min_width and image.height >= min_height
        assert image.width <= 4000 and image.height <= 4000
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn, not a blank canvas


def photo(width=320, height=240):
    gradient = np.linspace(0, 255, width, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(gradient, (height, 1))] * 3, axis=-1))


def test_center_crop_is_224_square_from_the_middle():
    image = Image.new("RGB", (448, 300), "blue")
    image.paste((255, 0, 0), (0, 0, 40, 300))  # a red strip that the crop must cut off
    crop = center_crop(image)
    assert crop.size == (224, 224)
    assert np.asarray(crop)[:, :, 0].max() < 30


def test_image_attention_png(tmp_path):
    attention = np.random.default_rng(0).random((12, 7, 7))
    out = image_attention_png(photo(), attention, tmp_path / "attention.png")
    assert out == tmp_path / "attention.png"
    assert_png(out, 600, 600)  # 13 panels in a 4 x 4 grid


def test_image_attention_single_head_and_constant_map(tmp_path):
    out = image_attention_png(photo(100, 400), np.ones((1, 3, 3)), tmp_path / "one.png")
    assert_png(out, 200, 100)


def test_image_attention_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="heads, grid, grid"):
        image_attention_png(photo(), np.zeros((7, 7)), tmp_path / "bad.png")


def test_text_attention_png(tmp_path):
    tokens = "a portrait of a woman with red hair taking a picture".split()
    weights = np.random.default_rng(1).dirichlet(np.ones(len(tokens)), size=8)
    out = text_attention_png(tokens, weights, tmp_path / "text.png")
    assert_png(out, 500, 250)


def test_text_attention_rejects_mismatched_tokens(tmp_path):
    with pytest.raises(ValueError, match="3 tokens"):
        text_attention_png(["a", "b", "c"], np.zeros((2, 4)), tmp_path / "bad.png")


def test_feature_space_with_thumbnails(tmp_path):
    rng = np.random.default_rng(2)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    thumbnails = [Image.new("RGB", (200, 120), c) for c in colours]
    points = np.repeat(np.eye(3), 2, axis=0) + 0.01 * rng.standard_normal((6, 3))
    out = feature_space_png(points, thumbnails, tmp_path / "space.png")
    assert_png(out, 400, 400)
    assert thumbnails[0].size == (200, 120)  # callers' images are not shrunk in place


def test_feature_space_with_text_labels_and_pca(tmp_path):
    sentences = [f"sentence number {i} about New York or Paris landmarks" for i in range(10)]
    points = np.random.default_rng(3).standard_normal((10, 512))
    assert_png(feature_space_png(points, sentences, tmp_path / "tsne.png"), 400, 400)
    assert_png(feature_space_png(points, sentences, tmp_path / "pca.png", method="pca"), 400, 400)


def test_perplexity_is_clamped_below_n():
    assert tsne_perplexity(1000) == 30
    assert tsne_perplexity(13) == 4
    assert tsne_perplexity(2) == 1
    assert all(tsne_perplexity(n) < n for n in range(2, 200))


def test_tsne_separates_clusters():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 4)
    points = rng.standard_normal((3, 64))[labels] + 0.3 * rng.standard_normal((12, 64))
    xy = embed_2d(points)
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = (labels[:, None] == labels[None]) & ~np.eye(12, dtype=bool)
    assert distances[labels[:, None] != labels[None]].mean() > 3 * distances[same].mean()


def test_embed_2d_handles_tiny_inputs():
    rng = np.random.default_rng(4)
    assert embed_2d(rng.standard_normal((4, 8))).shape == (4, 2)
    assert embed_2d(rng.standard_normal((2, 8))).shape == (2, 2)
    assert embed_2d(rng.standard_normal((1, 8))).shape == (1, 2)
    with pytest.raises(ValueError, match="unknown method"):
        embed_2d(rng.standard_normal((5, 8)), method="umap")


def test_feature_space_rejects_label_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 points but 2 labels"):
        feature_space_png(np.zeros((3, 4)), ["a", "b"], tmp_path / "bad.png")
