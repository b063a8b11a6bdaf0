"""The shape of a CoCa net, typed: what coca.model builds from (as open_clip's configs -> dataclasses).

    coca.loading.model_config("coca_ViT-B-32")        # a model open_clip (or coca/model_configs) knows
    CocaConfig.from_json("my-coca.json")              # open_clip's JSON layout
    CocaConfig.from_dict(open_clip.get_model_config(name))

Only the keys that change our modules are read; open_clip's others (attentional_pool, output_tokens,
embed_cls, custom_text ...) describe what our modules always are for CoCa.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Union


def _known(cls, values: dict) -> dict:
    """The entries of an open_clip sub-config that are fields of `cls`."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class VisionConfig:
    """ViT + attentional pooler (open_clip `vision_cfg`)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int = 64
    mlp_ratio: float = 4.0
    attn_pooler_heads: int = 8
    attn_pooler_queries: int = 256  # query 0 pools, the others feed the decoder

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """ImageEmbeddings per image: what the decoder reads."""
        return self.attn_pooler_queries - 1


@dataclass(frozen=True)
class TowerConfig:
    """A stack of causal blocks over tokens: the sizes the text tower and the decoder share."""

    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TextConfig(TowerConfig):
    """Causal text tower with a learned CLS (open_clip `text_cfg`)."""

    correct_cls_mask: bool = False  # legacy CoCa weights: False (see TextEncoder.key_validity)


@dataclass(frozen=True)
class DecoderConfig(TowerConfig):
    """Multimodal decoder: self-attention then cross-attention to the image, per layer (open_clip `multimodal_cfg`)."""


@dataclass(frozen=True)
class CocaConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    decoder: DecoderConfig

    @classmethod
    def from_dict(cls, cfg: dict) -> "CocaConfig":
        """From open_clip's layout: embed_dim, vision_cfg, text_cfg, multimodal_cfg."""
        return cls(
            embed_dim=cfg["embed_dim"],
            vision=VisionConfig(**_known(VisionConfig, cfg["vision_cfg"])),
            text=TextConfig(**_known(TextConfig, cfg["text_cfg"])),
            decoder=DecoderConfig(**_known(DecoderConfig, cfg["multimodal_cfg"])),
        )

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "CocaConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
