"""Choosing the next token: pure functions over logits (B, V), one row per sequence.

Every knob is a per-row tensor so that a Triton batch can mix sequences with
different settings. The order follows open_clip's `generate`: ban EOS before
the minimum length, repetition penalty, top-k, top-p, then temperature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .settings import SamplingParams  # re-exported: its home is torch-free

SOT, EOT, PAD = 49406, 49407, 0


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
