"""The user-facing model: images and texts in, ClassEmbeddings and captions out."""
from __future__ import annotations

import codecs
from typing import Iterable, Optional, Sequence

import numpy as np
import open_clip
import torch
from open_clip import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2

PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")

from . import media
from .errors import InvalidInputError
from .decoding import Caption
from .generate import generate
from .loading import create_open_clip, from_open_clip, resolve_dtype
from .model import CoCa, ImageEncoding, TextEncoding
from .prompts import DEFAULT_TEMPLATE, label_prompts
from .scoring import classify_probabilities, rank_by_distance
from .sampling import EOT, PAD, SOT, SamplingParams
from .texts import check_text

MAX_TOKENIZER_CACHE_WORDS = 50_000  # distinct words: a few MB of real words (a 1,000-letter one costs ~0.8 s to make)


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tokens_to_text(tokenizer, tokens: Sequence[int]) -> str:
    """Caption text of generated token ids (start, end and padding tokens dropped)."""
    return tokenizer.decode([t for t in tokens if t not in (SOT, EOT, PAD)]).strip()


WORD_END = "</w>"  # the BPE vocabulary's end-of-word mark, which decoding turns into a space


def text_so_far(tokenizer, tokens: Sequence[int]) -> str:
    """The text of an unfinished caption, as far as more tokens cannot change it: a prefix of
    `tokens_to_text(tokenizer, tokens + more)` whatever `more` is (so streamed pieces add up to the
    caption exactly). Held back: the bytes of a character not yet complete (decoded alone they would
    read as U+FFFD) and a trailing start of the word-end mark ("<", "</", "</w"); surrounding
    whitespace is stripped as tokens_to_text strips it."""
    kept = [t for t in tokens if t not in (SOT, EOT, PAD)]
    raw = bytes(tokenizer.byte_decoder[c] for c in "".join(tokenizer.decoder[t] for t in kept))
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)
    for cut in range(len(WORD_END) - 1, 0, -1):
        if text.endswith(WORD_END[:cut]):
            text = text[:-cut]
            break
    return text.replace(WORD_END, " ").strip()


class Coca:
    """One CoCa model with its tokenizer and preprocessing. Build it with `coca.load`."""

    def __init__(self, net: CoCa, model_name: str, pretrained: str, preprocess_cfg: dict):
        self.net = net
        self.model_name = model_name
        self.pretrained = pretrained
        self.preprocess_cfg = preprocess_cfg  # open_clip's: size, mean, std, interpolation, ...
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._tokenizer_cache_start = dict(getattr(self.tokenizer, "cache", None) or {})
        self.preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    # --- image encoder -------------------------------------------------
    def pixels(self, images: Sequence) -> torch.Tensor:
        """Decode (paths, bytes or PIL images) and preprocess exactly as open_clip: (B, 3, S, S)."""
        return torch.stack([self.preprocess(media.load_image(img)) for img in images]).to(self.net.device)

    @torch.inference_mode()
    def encode_images(self, images: Sequence, want_attention: bool = False) -> ImageEncoding:
        return self.net.visual(self.pixels(images), want_attention)

    def embed_images(self, images: Sequence, batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Normalised image ClassEmbeddings (N, E), float32."""
        chunks = batches(list(images), batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, total=-(-len(images) // batch_size), unit="batch", desc="embedding images")
        out = [self.encode_images(chunk).class_embedding.cpu().numpy() for chunk in chunks]
        return np.concatenate(out) if out else np.zeros((0, self.net.config.embed_dim), np.float32)

    # --- text encoder --------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        for i, text in enumerate(texts):
            check_text(text, f"text #{i + 1}")
        self._bound_tokenizer_cache()
        return self.tokenizer(list(texts))

    def _bound_tokenizer_cache(self):
        """open_clip's tokenizer remembers every distinct word forever: past a bound, it starts afresh
        (from the entries it was created with), so a long-running server's memory stays bounded."""
        cache = getattr(self.tokenizer, "cache", None)
        if isinstance(cache, dict) and len(cache) > MAX_TOKENIZER_CACHE_WORDS:
            self.tokenizer.cache = dict(self._tokenizer_cache_start)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], want_attention: bool = False) -> TextEncoding:
        return self.net.text(self.tokenize(texts).to(self.net.device), want_attention)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised text ClassEmbeddings (N, E), float32."""
        out = [self.encode_texts(chunk).class_embedding.cpu().numpy() for chunk in batches(list(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.net.config.embed_dim), np.float32)

    def token_strings(self, tokens: Sequence[int]) -> list[str]:
        return [self.tokenizer.decoder[t].replace("</w>", "") for t in tokens]

    # --- text decoder --------------------------------------------------
    def decode_text(self, tokens: Sequence[int]) -> str:
        return tokens_to_text(self.tokenizer, tokens)

    def text_so_far(self, tokens: Sequence[int]) -> str:
        """An unfinished caption's text that later tokens cannot change (see the module's text_so_far)."""
        return text_so_far(self.tokenizer, tokens)

    def caption_embeddings(self, image_embs: torch.Tensor, params: SamplingParams) -> list[Caption]:
        return [
            Caption(self.decode_text(g.tokens), g.tokens, g.logprobs)
            for g in generate(self.net, image_embs, params)
        ]

    def caption(self, images: Sequence, params: Optional[SamplingParams] = None, **settings) -> list[Caption]:
        """Captions for images (paths, bytes or PIL images)."""
        params = params or SamplingParams(**settings)
        return self.caption_embeddings(self.encode_images(images).image_embeddings, params)

    def encode_video(self, video, frames: int = 16) -> ImageEncoding:
        """A video as the mean of its frames: mean ImageEmbeddings, mean ClassEmbedding renormalised."""
        enc = self.encode_images(media.video_frames(video, frames))
        pooled = torch.nn.functional.normalize(enc.class_embedding.mean(0, keepdim=True), dim=-1)
        return ImageEncoding(pooled, enc.image_embeddings.mean(0, keepdim=True))

    def caption_video(self, video, frames: int = 16, params: Optional[SamplingParams] = None, **settings) -> Caption:
        params = params or SamplingParams(**settings)
        return self.caption_embeddings(self.encode_video(video, frames).image_embeddings, params)[0]

    # --- text <-> image ------------------------------------------------
    def rank(self, image, texts: Sequence[str]) -> list[tuple[str, float]]:
        """Texts sorted by cosine distance to the image (smaller = closer), as the card's ranking."""
        order, distances = rank_by_distance(self.embed_texts(texts), self.embed_images([image])[0])
        return [(texts[i], float(distances[i])) for i in order]

    def classify(self, image, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[tuple[str, float]]:
        """Zero-shot classification: labels with softmax probabilities, most likely first."""
        if not labels:
            raise InvalidInputError("give at least one label")
        prompts = label_prompts(template, labels)
        order, probs, _ = classify_probabilities(self.embed_texts(prompts), self.embed_images([image])[0],
                                                 self.logit_scale)
        return [(labels[i], float(probs[i])) for i in order]

    @property
    def logit_scale(self) -> float:
        return float(self.net.logit_scale.float().exp())


def load(
    model_name: str = "coca_ViT-B-32",
    pretrained: str = "laion2b_s13b_b90k",
    seed: int = 0,
    dtype="float32",
    device="cpu",
) -> Coca:
    """Load CoCa: an open_clip tag (hub), a local checkpoint file, or 'random' (from `seed`)."""
    reference = create_open_clip(model_name, pretrained, seed)
    return from_reference(model_name, pretrained, reference, dtype, device)


def from_reference(model_name: str, pretrained: str, reference: torch.nn.Module, dtype="float32", device="cpu") -> Coca:
    """Wrap an open_clip CoCa (its weights, its preprocessing) as our runtime."""
    preprocess_cfg = {k: v for k, v in get_model_preprocess_cfg(reference).items() if k in PREPROCESS_KEYS}
    net = from_open_clip(model_name, reference, resolve_dtype(dtype), device)
    return Coca(net, model_name, pretrained, preprocess_cfg)
