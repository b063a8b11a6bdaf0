"""How to generate one caption: SamplingParams, the one home of the nine settings, their defaults and
their bounds. No torch here, so light layers (the search service, clients, the CLI) can use it;
coca.sampling (the token choice itself) re-exports it.

The wire forms are checked against it by tests/test_settings.py: the service's SamplingSettings
message, the client's Sampling, the decoder's START inputs (serving.protocol.SAMPLING_INPUTS and
config.pbtxt) and the CLI's options.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

from .errors import InvalidInputError

MAX_TOKENS_LIMIT = 75  # the decoder's context is 76 positions, SOT included

# Bounds of the settings (documented in README.md and search_service/README.md). Inside them every
# logit stays finite: logits are O(10), so dividing by a temperature of 0.01 or a penalty of 0.1
# leaves them far from float32's overflow, where softmax would give NaN and sampling would fail.
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 0.01  # the smallest temperature above 0 (0 itself is greedy)
REPETITION_PENALTY_RANGE = (0.1, 10.0)
MAX_BEAMS = 16  # rows of the decoder's cache one beam search takes; the model card uses 6


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one caption. Defaults are the model card's.

    max_tokens counts generated tokens, EOS included; as in open_clip, a caption
    that reaches it ends with a forced EOS. EOS (and PAD, which also ends a
    sequence in open_clip) is banned before min_tokens tokens.
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
    """

    temperature: float = 0.0
    top_k: int = 100
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_tokens: int = 4
    max_tokens: int = 25
    num_beams: int = 1
    num_beam_groups: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        problems = []
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            problems.append(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], "
                            f"got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            problems.append(f"repetition_penalty must be in [{low}, {high:g}] (1 = off), got {self.repetition_penalty}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            problems.append(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if not 0 <= self.min_tokens <= MAX_TOKENS_LIMIT:
            problems.append(f"min_tokens must be in [0, {MAX_TOKENS_LIMIT}], got {self.min_tokens}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            problems.append(f"num_beams must be in [1, {MAX_BEAMS}], got {self.num_beams}")
        elif self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
            problems.append(
                f"num_beams ({self.num_beams}) must be a positive multiple of num_beam_groups ({self.num_beam_groups})"
            )
        if problems:
            raise InvalidInputError("bad generation settings: " + "; ".join(problems))

    @property
    def effective_min_tokens(self) -> int:
        return min(self.min_tokens, self.max_tokens - 1)

    @classmethod
    def from_float32(cls, values: dict) -> "SamplingParams":
        """Settings that travelled as float32 (protobuf, Triton): each float is taken as the shortest
        decimal that rounds to it, i.e. as the caller wrote it (0.01, not 0.009999999776)."""
        return cls(**{name: float(str(np.float32(v))) if isinstance(v, float) else v for name, v in values.items()})

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InvalidInputError(f"unknown generation settings: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
