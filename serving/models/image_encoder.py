"""Triton model coca_image_encoder: encoded image bytes -> ClassEmbedding, ImageEmbeddings, attention."""
from __future__ import annotations

import torch

from .common import EncoderModel


class ImageEncoderModel(EncoderModel):
    part = "image_encoder"

    def prepare(self, request) -> torch.Tensor:
        images = self.input(request, "IMAGE").reshape(-1)  # bytes objects, one per image
        return self.coca.pixels(list(images))  # InvalidImageError names the broken image

    def forward(self, batch: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        if self.onnx is not None and "ATTENTION" not in wanted:
            class_embedding, image_embeddings = self.onnx.encode_pixels(batch)
            return {"CLASS_EMBEDDING": class_embedding, "IMAGE_EMBEDDINGS": image_embeddings}
        encoding = self.coca.net.visual(batch, want_attention="ATTENTION" in wanted)
        outputs = {"CLASS_EMBEDDING": encoding.class_embedding, "IMAGE_EMBEDDINGS": encoding.image_embeddings}
        if encoding.attention is not None:  # the last ViT block's, only when some request asked
            outputs["ATTENTION"] = encoding.attention
        return outputs
