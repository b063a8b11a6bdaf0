"""PNG pictures of what the model looks at, in the spirit of the model card:
image attention heat-maps, text attention bars, and a 2-D feature-space map.

Figures are built with matplotlib.figure.Figure directly (Agg renders them on
savefig), never through pyplot: no global backend or figure registry is
touched, so this is safe inside servers and threads, and nothing leaks.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from PIL import Image

# The card paints attention value v as RGB (v, 1-v, 1-v): cyan for none, red for most.
ATTENTION_CMAP = LinearSegmentedColormap.from_list("card_attention", [(0, 1, 1), (1, 0, 0)])
OVERLAY_ALPHA = 0.4
CROP_SIZE = 224  # what the image encoder sees: shortest side resized to 224, centre crop
THUMBNAIL_PX = 64
DPI = 100


def center_crop(image: Image.Image, size: int = CROP_SIZE) -> Image.Image:
    """Shortest side resized to `size` (bicubic), then the central size x size square,
    as open_clip's preprocessing does, so heat-map cells line up with patches."""
    scale = size / min(image.size)
    resized = image.convert("RGB").resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _rescale(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (the card's ImageAdjust); a constant map becomes all 0."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values, dtype=float)


def _save(figure: Figure, out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    figure.savefig(out_path, format="png", dpi=DPI, bbox_inches="tight")
    return out_path


def image_attention_png(image: Image.Image, attention: np.ndarray, out_path: str | os.PathLike) -> Path:
    """One panel per head, then their mean: each head's (grid x grid) attention
    over the patches, rescaled to [0, 1] and laid with alpha 0.4 over the
    centre-cropped 224 px image."""
    attention = np.asarray(attention, dtype=float)
    if attention.ndim != 3 or attention.shape[0] < 1:
        raise ValueError(f"attention must be (heads, grid, grid), got shape {attention.shape}")
    maps = list(attention) + [attention.mean(axis=0)]
    titles = [f"head {i}" for i in range(1, len(attention) + 1)] + ["mean"]
    background = np.asarray(center_crop(image))

    columns = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / columns)
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, heat, title in zip(axes, maps, titles):
        ax.imshow(background)
        # extent stretches the coarse grid over the crop; cells stay sharp like patches
        ax.imshow(_rescale(heat), cmap=ATTENTION_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1,
                  extent=(0, CROP_SIZE, CROP_SIZE, 0), interpolation="nearest")
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    return _save(figure, out_path)


def text_attention_png(tokens: Sequence[str], weights: np.ndarray, out_path: str | os.PathLike) -> Path:
    """Left: horizontal bars of each token's attention weight averaged over the
    heads, first token on top (the card's bar chart). Right: the per-head
    weights as a heads x tokens heat-map."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2 or weights.shape[1] != len(tokens) or not len(tokens):
        raise ValueError(f"weights must be (heads, {len(tokens)} tokens), got shape {weights.shape}")
    heads = weights.shape[0]
    positions = np.arange(len(tokens))

    figure = Figure(figsize=(6 + 0.35 * len(tokens), 1.5 + 0.3 * max(len(tokens), heads)))
    bars, grid = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    bars.barh(positions, weights.mean(axis=0), color="tab:red")
    bars.set_yticks(positions, labels=list(tokens))
    bars.invert_yaxis()  # read top to bottom, like the sentence
    bars.set_xlabel("mean attention weight")

    image = grid.imshow(weights, cmap="Reds", aspect="auto", interpolation="nearest")
    grid.set_xticks(positions, labels=list(tokens), rotation=60, ha="right")
    grid.set_yticks(np.arange(heads), labels=[f"head {i}" for i in range(1, heads + 1)])
    figure.colorbar(image, ax=grid, label="attention weight")
    figure.tight_layout()
    return _save(figure, out_path)


def tsne_perplexity(n_points: int) -> float:
    """30 (scikit-learn's default) clamped to (N - 1) / 3 for small sets.

    scikit-learn requires perplexity < N, but at N - 1 every point is
    everyone's neighbour equally and clusters vanish: for 3 clusters of 4
    points, between/within-cluster distance ratio 1.0 at perplexity 11 versus
    8.2 at 3.7. Barnes-Hut also uses about 3 * perplexity neighbours.
    """
    return min(30.0, max(1.0, (n_points - 1) / 3))


# Below this many points exact t-SNE is both faster than Barnes-Hut (which
# took 2-5 s for 6 points here) and exact; above it its O(N^2) cost shows.
EXACT_TSNE_MAX_POINTS = 500


def embed_2d(points: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) by t-SNE (see tsne_perplexity) or PCA. Fewer than 3
    points are placed on a line, as neither method has anything to arrange."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be (N, D) with N >= 1, got shape {points.shape}")
    if method not in ("tsne", "pca"):
        raise ValueError(f"unknown method {method!r}: use 'tsne' or 'pca'")
    if len(points) < 3:
        return np.stack([np.arange(len(points), dtype=float), np.zeros(len(points))], axis=1)
    if method == "tsne":
        from sklearn.manifold import TSNE  # slow import; only this function needs it

        exact = len(points) <= EXACT_TSNE_MAX_POINTS
        return TSNE(n_components=2, perplexity=tsne_perplexity(len(points)), init="pca", random_state=seed,
                    method="exact" if exact else "barnes_hut").fit_transform(points)
    from sklearn.decomposition import PCA

    projected = PCA(n_components=min(2, points.shape[1]), random_state=seed).fit_transform(points)
    return np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))


def feature_space_png(points: np.ndarray, labels: Sequence[str] | Sequence[Image.Image],
                      out_path: str | os.PathLike, method: str = "tsne") -> Path:
    """Scatter of the points in 2-D (`method`: "tsne" or "pca"), each marked
    by its thumbnail (PIL images) or its text label (strings, wrapped)."""
    if len(labels) != len(points):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    xy = embed_2d(points, method)

    figure = Figure(figsize=(7, 6.3))
    ax = figure.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], s=12, color="tab:blue")
    for (x, y), label in zip(xy, labels):
        if isinstance(label, Image.Image):
            thumb = label.convert("RGB")
            thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(thumb)), (x, y), frameon=False))
        else:
            ax.annotate(textwrap.fill(str(label), 28), (x, y), fontsize=7, ha="center", va="bottom",
                        xytext=(0, 4), textcoords="offset points")
    margin = 0.15 * max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]), 1e-6)
    ax.set_xlim(xy[:, 0].min() - margin, xy[:, 0].max() + margin)
    ax.set_ylim(xy[:, 1].min() - margin, xy[:, 1].max() + margin)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"feature space ({method})")
    return _save(figure, out_path)
