"""Choosing the next token: pure functions over logits (B, V), one row per sequence.

Every knob is a per-row tensor so that a Triton batch can mix sequences with
different settings. The order follows open_clip's `generate`: ban EOS before
the minimum length, repetition penalty, top-k, top-p, then temperature.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch

from .errors import InvalidInputError

SOT, EOT, PAD = 49406, 49407, 0
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


@dataclass
class RowParams:
    """SamplingParams of B sequences, as tensors (B,)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    min_tokens: torch.Tensor
    generators: list  # torch.Generator per row, or None for greedy rows

    @classmethod
    def stack(cls, params: list[SamplingParams]) -> "RowParams":
        return cls(
            temperature=torch.tensor([p.temperature for p in params]),
            top_k=torch.tensor([p.top_k for p in params]),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params]),
            min_tokens=torch.tensor([p.effective_min_tokens for p in params]),
            generators=[new_generator(p) for p in params],
        )

    @classmethod
    def cat(cls, parts: list["RowParams"]) -> "RowParams":
        """Rows of several sequences, in order; generators are shared, not copied."""
        return cls(
            *(torch.cat([getattr(p, name) for p in parts]) for name in _TENSOR_FIELDS),
            generators=[g for p in parts for g in p.generators],
        )


_TENSOR_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "min_tokens")


def new_generator(params: SamplingParams) -> Optional[torch.Generator]:
    """Each sequence draws from its own generator, so batching never changes a seeded caption."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def ban_early_end(logits: torch.Tensor, generated: torch.Tensor, min_tokens: torch.Tensor) -> torch.Tensor:
    """No EOS before min_tokens tokens (open_clip's MinLengthLogitsProcessor)."""
    early = generated < min_tokens
    if early.any():
        logits[early, EOT] = float("-inf")
    return logits


def penalise_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, with a per-row penalty. history (B, L)."""
    if bool((penalty == 1).all()):
        return logits
    seen = logits.gather(1, history)
    p = penalty[:, None].to(logits.dtype)
    return logits.scatter(1, history, torch.where(seen < 0, seen * p, seen / p))


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k logits (0 = all), as transformers' TopKLogitsWarper."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k == vocab).all()):
        return logits
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter, as transformers' TopPLogitsWarper: drop the least likely tail of mass 1 - top_p."""
    if bool((top_p >= 1).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    tail = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p[:, None]).to(logits.dtype)
    tail[:, -1] = False  # always keep the most likely token
    return logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))


def usable_rows(scores: torch.Tensor) -> torch.Tensor:
    """(B,) whether each row of scores (B, V) can be chosen from: no NaN, no +inf, something finite.
    (softmax of such a row is a valid distribution; of any other row it holds NaN.)"""
    return ~(scores.isnan() | scores.isposinf()).any(dim=-1) & scores.isfinite().any(dim=-1)


def choose(logits: torch.Tensor, history: torch.Tensor, generated: torch.Tensor, rows: RowParams):
    """Next token and its model log-probability for each row, and which rows failed. logits (B, V) fp32.

    A row whose scores are not a usable distribution (NaN or infinite logits from a broken input)
    fails alone: its token is meaningless and `failed` (B,) says so; the other rows are unaffected.
    """
    logprobs = logits.log_softmax(dim=-1)
    logits = ban_early_end(logits.clone(), generated, rows.min_tokens)
    logits = penalise_repeats(logits, history, rows.repetition_penalty)
    failed = ~usable_rows(logits)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, g in enumerate(rows.generators) if g is not None and not failed[i]]
    if sampled:
        index = torch.tensor(sampled)
        filtered = filter_top_p(filter_top_k(logits[index], rows.top_k[index]), rows.top_p[index])
        scaled = filtered / rows.temperature[index, None]
        probs = scaled.softmax(dim=-1)
        usable = usable_rows(scaled).tolist()
        for j, i in enumerate(sampled):
            if usable[j]:
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows.generators[i])[0]
            else:
                failed[i] = True
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0], failed
