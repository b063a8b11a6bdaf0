"""Triton model coca_text_encoder: texts -> ClassEmbedding (+ last-layer attention and its tokens)."""
from __future__ import annotations

import torch

from coca.errors import InvalidTextError

from .common import EncoderModel

DETAIL_OUTPUTS = {"ATTENTION", "TOKENS"}


class TextEncoderModel(EncoderModel):
    part = "text_encoder"

    def prepare(self, request) -> torch.Tensor:
        texts = []
        for i, raw in enumerate(self.input(request, "TEXT").reshape(-1)):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidTextError(f"text #{i + 1} is not UTF-8: {exc}") from exc
        return self.coca.tokenize(texts)  # InvalidTextError for an empty text

    def forward_groups(self, good: list[int], wanted: list[set[str]]) -> list[list[int]]:
        # The attention matrix spans the longest text of the forward: a request that asks for
        # it is encoded alone, so its shape and values are those of encoding its texts in process.
        plain = [i for i in good if not wanted[i] & DETAIL_OUTPUTS]
        return ([plain] if plain else []) + [[i] for i in good if wanted[i] & DETAIL_OUTPUTS]

    def forward(self, batch: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        if self.onnx is not None and not wanted & DETAIL_OUTPUTS:
            return {"CLASS_EMBEDDING": self.onnx.encode_texts(self.coca.net.text, batch)}
        encoding = self.coca.net.text(batch, want_attention=bool(wanted & DETAIL_OUTPUTS))
        outputs = {"CLASS_EMBEDDING": encoding.class_embedding}
        if encoding.attention is not None:
            outputs["ATTENTION"] = encoding.attention[-1]
            outputs["TOKENS"] = encoding.kept_tokens
        return outputs
