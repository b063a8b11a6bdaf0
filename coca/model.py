"""CoCa as three parts: image encoder, text encoder, text decoder.

Small modules, one idea each. Parameter names mirror open_clip's CoCa exactly
(`visual.transformer.resblocks.0.attn.in_proj_weight`, ...), so an open_clip
state dict loads with `strict=True` and our safetensors exports are open_clip
checkpoints too.

Shapes use B = batch, T = query length, L = key length, H = heads,
D = head dim, W = width, V = vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import CocaConfig, DecoderConfig, TextConfig, VisionConfig
from .kv_cache import CrossKV, DecoderCache, KVCache


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as open_clip does for bf16/fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, W)


def attend(q, k, v, mask: Optional[torch.Tensor], want_weights: bool):
    """Scaled dot-product attention; explicit softmax when weights are wanted or for one query
    (a decode step: the fused CPU kernel's set-up costs more than the tiny matmuls it saves)."""
    if not want_weights and q.shape[-2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights @ v, weights


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout.

    open_clip stores a packed `in_proj_weight` (3W, W) when keys/values have the
    query width, else separate q/k/v projection weights (the attentional pooler
    of ViT-B/32 reads 768-wide tokens into 512-wide queries).
    """

    def __init__(self, width: int, heads: int, kv_width: Optional[int] = None):
        super().__init__()
        kv_width = kv_width or width
        self.heads = heads
        self.packed = kv_width == width
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(width, width))
            self.k_proj_weight = nn.Parameter(torch.empty(width, kv_width))
            self.v_proj_weight = nn.Parameter(torch.empty(width, kv_width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.kernels: dict = {}  # projection name -> faster replacement (coca/quant.py); empty: F.linear

    def _weights(self):
        if self.packed:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _project(self, name: str, x, weight, bias):
        kernel = self.kernels.get(name)
        return F.linear(x, weight, bias) if kernel is None else kernel(x)

    def project_q(self, x):
        wq, _, _ = self._weights()
        return split_heads(self._project("q", x, wq, self.in_proj_bias.chunk(3)[0]), self.heads)

    def project_kv(self, x):
        _, wk, wv = self._weights()
        _, bk, bv = self.in_proj_bias.chunk(3)
        return split_heads(self._project("k", x, wk, bk), self.heads), split_heads(self._project("v", x, wv, bv), self.heads)

    def project_qkv(self, x):
        if not self.packed:
            return (self.project_q(x), *self.project_kv(x))
        q, k, v = self._project("qkv", x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def output(self, o):
        return self.out_proj(merge_heads(o))


class Block(nn.Module):
    """Pre-norm self-attention block (open_clip ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x, mask=None, want_weights=False, cache: Optional[KVCache] = None, slots=None, pos=None):
        q, k, v = self.attn.project_qkv(self.ln_1(x))
        if cache is not None:
            k, v = cache.update(slots, pos, k, v, mask.shape[-1])
        o, weights = attend(q, k, v, mask, want_weights)
        x = x + self.attn.output(o)
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: text queries read the image embeddings."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.ln_1_kv = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def image_kv(self, image_embs):
        return self.attn.project_kv(self.ln_1_kv(image_embs))  # 2 x (B, H, N, D)

    def forward(self, x, k, v):
        q = self.attn.project_q(self.ln_1(x))
        if isinstance(k, list):  # scattered slots: attend row by row over views, no gather
            o = torch.cat([attend(q[i : i + 1], ki[None], vi[None], None, False)[0] for i, (ki, vi) in enumerate(zip(k, v))])
        else:
            o, _ = attend(q, k, v, None, False)
        x = x + self.attn.output(o)
        return x + self.mlp(self.ln_2(x))


class Blocks(nn.Module):
    """open_clip's `transformer.resblocks` container."""

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, mask=None, want_weights=False):
        all_weights = []
        for block in self.resblocks:
            x, weights = block(x, mask, want_weights)
            all_weights.append(weights)
        return x, all_weights


class AttentionalPooler(nn.Module):
    """256 learned queries read the ViT tokens; query 0 becomes the ClassEmbedding."""

    def __init__(self, width: int, context_width: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(queries, width))
        self.attn = Attention(width, heads, kv_width=context_width)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(context_width)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.attn.project_q(self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1))
        k, v = self.attn.project_kv(x)
        o, _ = attend(q, k, v, None, False)
        return self.attn.output(o)  # (B, queries, W)


@dataclass
class ImageEncoding:
    class_embedding: torch.Tensor  # (B, E) normalised
    image_embeddings: torch.Tensor  # (B, queries - 1, W): what the decoder reads
    attention: Optional[torch.Tensor] = None  # (B, H, 1 + P, 1 + P), last ViT block


class ImageEncoder(nn.Module):
    """ViT + attentional pooler (open_clip `visual` with attentional_pool=True)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        width, patch, grid = cfg.width, cfg.patch_size, cfg.grid
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Blocks(width, cfg.heads, cfg.layers, cfg.mlp_ratio)
        self.attn_pool = AttentionalPooler(embed_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries)
        self.ln_post = LayerNorm(embed_dim)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.grid = grid

    def forward(self, pixels: torch.Tensor, want_attention: bool = False) -> ImageEncoding:
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x, weights = self._transformer(x, want_attention)
        x = self.ln_post(self.attn_pool(x))
        pooled = F.normalize((x[:, 0] @ self.proj).float(), dim=-1)
        return ImageEncoding(pooled, x[:, 1:], weights)

    def _transformer(self, x, want_attention):
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x, _ = block(x)
        x, weights = blocks[-1](x, want_weights=want_attention)
        return x, weights


@dataclass
class TextEncoding:
    class_embedding: torch.Tensor  # (B, E) normalised
    attention: Optional[list] = None  # per layer (B, H, n + 1, n + 1), n = kept tokens
    kept_tokens: Optional[torch.Tensor] = None  # (B, n) the token ids the weights refer to


class TextEncoder(nn.Module):
    """Causal text transformer with a learned CLS appended (open_clip `text`, embed_cls=True).

    The decoder reuses this tower without its CLS: see `embed_step`.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, pad_id: int = 0):
        super().__init__()
        width, self.context_length = cfg.width, cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length + 1, width))
        self.cls_emb = nn.Parameter(torch.empty(width))
        self.transformer = Blocks(width, cfg.heads, cfg.layers, cfg.mlp_ratio)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.pad_id = pad_id
        self.correct_cls_mask = cfg.correct_cls_mask

    def key_validity(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's pad mask over the context_length + 1 keys, CLS key last.

        Legacy CoCa weights (correct_cls_mask=False) put the CLS's "always valid"
        flag first, which shifts the pad mask right by one: key j is valid when
        token j-1 is not padding. We reproduce it bit for bit.
        """
        valid = text != self.pad_id  # (B, C)
        ones = valid.new_ones(valid.shape[0], 1)
        return torch.cat([valid, ones] if self.correct_cls_mask else [ones, valid], dim=1)  # (B, C + 1)

    def forward(self, text: torch.Tensor, want_attention: bool = False) -> TextEncoding:
        """ClassEmbedding over the real tokens only, equal to open_clip's 76-padded result."""
        return self.encode(*self.trim(text), want_attention)

    def trim(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens (B, n) up to the last real one + 1, and which of their n + 1 keys are valid (CLS last).

        Keys past the last real token + 1 are masked for the CLS in open_clip anyway,
        so we drop them (see key_validity); the CLS keeps its position, context_length.
        """
        text = text[:, : self.context_length]
        last_real = (text != self.pad_id).int().cumsum(1).argmax(1)  # index of the last real token
        n = int(min(last_real.max().item() + 2, self.context_length))
        valid = self.key_validity(text)
        return text[:, :n], torch.cat([valid[:, :n], valid[:, -1:]], dim=1)  # (B, n), (B, n + 1)

    def encode(self, tokens: torch.Tensor, key_valid: torch.Tensor, want_attention: bool = False) -> TextEncoding:
        """The tower over trimmed tokens (no data-dependent shapes: what the ONNX export traces)."""
        n = tokens.shape[1]
        causal = torch.ones(n + 1, n + 1, dtype=torch.bool, device=tokens.device).tril()
        mask = (causal & key_valid[:, None, :])[:, None]  # (B, 1, n + 1, n + 1)
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        cls = (self.cls_emb + self.positional_embedding[self.context_length]).to(dtype)
        x = torch.cat([x, cls.view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
        x, weights = self.transformer(x, mask, want_attention)
        pooled = self.ln_final(x[:, -1]) @ self.text_projection
        return TextEncoding(
            F.normalize(pooled.float(), dim=-1),
            weights if want_attention else None,
            tokens if want_attention else None,
        )

    def embed_step(self, tokens, pos, cache: DecoderCache, slots):
        """Token outputs for the decoder, with the tower's own KV cache. tokens (B, T), pos (B,)."""
        positions = pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # (B, T)
        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        mask = cache.causal_mask(positions)
        for block, kv in zip(self.transformer.resblocks, cache.text):
            x, _ = block(x, mask, cache=kv, slots=slots, pos=positions)
        return x


class TextDecoder(nn.Module):
    """Multimodal decoder: causal self-attention then cross-attention to the image, per layer."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        width, heads, mlp_ratio = cfg.width, cfg.heads, cfg.mlp_ratio
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(cfg.layers)])
        self.cross_attn = nn.ModuleList([CrossBlock(width, heads, mlp_ratio) for _ in range(cfg.layers)])
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, cfg.vocab_size))
        self.vocab_kernel = None  # faster replacement of `@ text_projection` (coca/quant.py)

    def vocab_logits(self, x):
        x = self.ln_final(x)
        return x @ self.text_projection if self.vocab_kernel is None else self.vocab_kernel(x)

    def image_kv(self, image_embs):
        """Cross-attention K/V of every layer, computed once per image."""
        return [block.image_kv(image_embs) for block in self.cross_attn]

    def forward(self, x, positions, cache: DecoderCache, slots, last_only: bool = True):
        mask = cache.causal_mask(positions)
        for block, cross, kv, xkv in zip(self.resblocks, self.cross_attn, cache.decoder, cache.cross):
            x, _ = block(x, mask, cache=kv, slots=slots, pos=positions)
            x = cross(x, *xkv.read(slots))
        if last_only:
            x = x[:, -1:]
        return self.vocab_logits(x).float()  # (B, T, V)


class CoCa(nn.Module):
    """The whole net, with open_clip's module names; built from a CocaConfig (or open_clip's config dict)."""

    def __init__(self, cfg: Union[CocaConfig, dict], pad_id: int = 0):
        super().__init__()
        cfg = cfg if isinstance(cfg, CocaConfig) else CocaConfig.from_dict(cfg)
        self.config = cfg
        self.visual = ImageEncoder(cfg.vision, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, cfg.embed_dim, pad_id)
        self.text_decoder = TextDecoder(cfg.decoder)
        self.logit_scale = nn.Parameter(torch.empty(()))

    @property
    def dtype(self) -> torch.dtype:
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def _weight(self) -> torch.Tensor:
        """The vocabulary projection; in a net holding one part (coca.loading.load_part, the
        others left on the meta device) the first weight that part loaded."""
        weight = self.text_decoder.text_projection
        if weight.is_meta:  # a part is whole top-level modules: their first weights say which are loaded
            # (walking every parameter instead cost 0.5 ms per call, per Triton request)
            firsts = (next(m.parameters()) for m in (self.text, self.visual))
            weight = next((p for p in firsts if not p.is_meta), weight)
        return weight

    def new_cache(self, capacity: int, max_len: Optional[int] = None) -> DecoderCache:
        """Preallocated KV caches for `capacity` concurrent sequences."""
        t, d = self.config.text, self.config.decoder
        return DecoderCache(
            capacity=capacity,
            max_len=max_len or d.context_length,
            text_layers=t.layers, text_heads=t.heads, text_width=t.width,
            decoder_layers=d.layers, decoder_heads=d.heads, decoder_width=d.width,
            image_tokens=self.config.vision.image_tokens,
            dtype=self.dtype,
            device=self.device,
        )

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step must read: both causal towers, the cross blocks
        less their key/value projections (applied once per image), the vocabulary projection."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        cross_kv = [p for b in self.text_decoder.cross_attn for p in (*b.ln_1_kv.parameters(),)]
        cross_kv_proj = sum(nbytes([b.attn.in_proj_weight, b.attn.in_proj_bias]) * 2 // 3 for b in self.text_decoder.cross_attn)
        return (
            nbytes(self.text.transformer.parameters())
            + nbytes(self.text_decoder.parameters())
            - nbytes(cross_kv)
            - cross_kv_proj
        )

    def start_sequences(self, cache: DecoderCache, slots: torch.Tensor, image_embs: torch.Tensor):
        """Store each slot's cross-attention K/V; its self-attention caches restart at position 0."""
        cache.set_image(slots, self.text_decoder.image_kv(image_embs.to(device=self.device, dtype=self.dtype)))

    def decode(self, tokens, pos, cache: DecoderCache, slots, last_only: bool = True):
        """Advance sequences by tokens (B, T) written at positions pos (B,) + [0, T): logits (B, T', V)."""
        positions = pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.text.embed_step(tokens, pos, cache, slots)
        return self.text_decoder(x, positions, cache, slots, last_only)

    def teacher_forced_logits(self, image_embs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for every position of whole captions (B, T): the uncached reference path."""
        cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        slots = slice(0, tokens.shape[0])
        self.start_sequences(cache, slots, image_embs)
        start = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return self.decode(tokens, start, cache, slots, last_only=False)
