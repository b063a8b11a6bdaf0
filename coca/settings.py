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

from .errors import InvalidInputError

MAX_TOKENS_LIMIT = 75  # the decoder's context is 76 positions, SOT included


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
        if not 0 <= self.temperature <= 100:
            problems.append(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            problems.append(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if self.min_tokens < 0:
            problems.append(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.num_beams < 1 or self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
            problems.append(
                f"num_beams ({self.num_beams}) must be a positive multiple of num_beam_groups ({self.num_beam_groups})"
            )
        if problems:
            raise InvalidInputError("bad generation settings: " + "; ".join(problems))

    @property
    def effective_min_tokens(self) -> int:
        return min(self.min_tokens, self.max_tokens - 1)

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InvalidInputError(f"unknown generation settings: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
