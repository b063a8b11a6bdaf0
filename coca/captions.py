"""What one caption is: its text, its tokens and their log-probabilities. No torch here, so the
search service and clients that receive captions from Triton can hold them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Caption:
    text: str
    tokens: list[int]
    logprobs: list[float]
