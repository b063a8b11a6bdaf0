"""The scoring of Rank and Classify, over embeddings already computed: numpy only, so the model
(coca.runtime.Coca) and the search service (which gets its embeddings from Triton) share it."""
from __future__ import annotations

import numpy as np


def rank_by_distance(text_vectors: np.ndarray, image_vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (1 - similarity) of normalised text vectors (N, E) to an image vector (E,),
    and the order that sorts them, closest first (ties keep input order)."""
    distances = 1 - text_vectors @ image_vector
    return np.argsort(distances, kind="stable"), distances


def classify_probabilities(text_vectors: np.ndarray, image_vector: np.ndarray,
                           logit_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-shot classification: softmax over logit_scale x cosine similarity; returns the order
    (most likely first, ties keep input order), the probabilities and the similarities."""
    similarity = text_vectors @ image_vector
    logits = logit_scale * similarity
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return np.argsort(-probs, kind="stable"), probs, similarity
