"""Preallocated key/value caches for cached ("efficient") caption generation.

Each sequence owns a slot. Buffers are allocated once for `capacity` slots and
written by index, as in gpt-fast. `slots` is either a `slice` (a contiguous run
of slots: reads are views, no copy) or a LongTensor of slot ids (sequences of a
Triton batch live anywhere in the pool: self-attention reads gather, the large
cross-attention K/V are read row by row as views).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

Slots = Union[slice, torch.Tensor]


def slot_rows(slots: Slots, device=None) -> torch.Tensor:
    if isinstance(slots, slice):
        return torch.arange(slots.start, slots.stop, device=device)
    return slots


class KeyValueBuffers(nn.Module):
    """Preallocated keys and values of one layer: (capacity, H, length, D), never saved with the model."""

    def __init__(self, capacity: int, heads: int, length: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (capacity, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class KVCache(KeyValueBuffers):
    """Self-attention keys and values of one layer: length = max positions."""

    def update(self, slots: Slots, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """Write k, v (B, H, T, D) at positions (B, T); return keys/values 0..length-1, (B, H, L, D)."""
        rows = slot_rows(slots, k.device)[:, None]  # (B, 1)
        self.k[rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, H, D)
        self.v[rows, :, positions] = v.transpose(1, 2)
        # a slice reads views; a tensor of slot ids gathers (small: L is the caption so far)
        return self.k[slots, :, :length], self.v[slots, :, :length]

    def reorder(self, slots: Slots, source: torch.Tensor):
        """Beam search: slot i takes the history of slot source[i]."""
        rows = slot_rows(slots, source.device)
        self.k[rows] = self.k[source]
        self.v[rows] = self.v[source]


class CrossKV(KeyValueBuffers):
    """Cross-attention keys and values of one layer, computed once per image: length = image tokens."""

    def write(self, slots: Slots, k: torch.Tensor, v: torch.Tensor):
        self.k[slots] = k
        self.v[slots] = v

    def read(self, slots: Slots):
        """(B, H, N, D) views for a slice; per-row lists of views for scattered slots."""
        if isinstance(slots, slice):
            return self.k[slots], self.v[slots]
        rows = slots.tolist()
        return [self.k[r] for r in rows], [self.v[r] for r in rows]


class DecoderCache(nn.Module):
    """Everything one decoding sequence remembers, for `capacity` sequences.

    text: the text tower's self-attention (the decoder reads its token outputs),
    decoder: the multimodal decoder's self-attention, cross: its image K/V.
    """

    def __init__(
        self, *, capacity: int, max_len: int,
        text_layers: int, text_heads: int, text_width: int,
        decoder_layers: int, decoder_heads: int, decoder_width: int,
        image_tokens: int, dtype, device=None,
    ):
        super().__init__()
        self.capacity, self.max_len = capacity, max_len
        self.text = nn.ModuleList(
            KVCache(capacity, text_heads, max_len, text_width // text_heads, dtype, device)
            for _ in range(text_layers)
        )
        self.decoder = nn.ModuleList(
            KVCache(capacity, decoder_heads, max_len, decoder_width // decoder_heads, dtype, device)
            for _ in range(decoder_layers)
        )
        self.cross = nn.ModuleList(
            CrossKV(capacity, decoder_heads, image_tokens, decoder_width // decoder_heads, dtype, device)
            for _ in range(decoder_layers)
        )

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def set_image(self, slots: Slots, layer_kv):
        for cross, (k, v) in zip(self.cross, layer_kv):
            cross.write(slots, k, v)

    def reorder(self, slots: Slots, source: torch.Tensor):
        for cache in (*self.text, *self.decoder):
            cache.reorder(slots, source)

    def causal_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Key j is visible to the query at position p when j <= p: (B, 1, T, L)."""
        length = int(positions.max()) + 1
        if length > self.max_len:
            raise ValueError(f"sequence longer than the cache ({length} > {self.max_len} positions)")
        keys = torch.arange(length, device=positions.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # (B, T, L)
        return mask[:, None]
