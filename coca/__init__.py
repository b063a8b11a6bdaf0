"""coca: the one CoCa (Contrastive Captioner) implementation of coca-search.

    import coca
    model = coca.load("coca_ViT-B-32", pretrained="laion2b_s13b_b90k")   # or a file, or "random"
    model.caption(["photo.jpg"])[0].text
    model.embed_images(["photo.jpg"]), model.embed_texts(["a dog"])
"""
from .errors import (
    CapacityError, CocaError, GenerationError, InvalidImageError, InvalidInputError, InvalidTextError,
    InvalidVideoError, UnknownModelError, WeightsUnavailableError,
)

# open_clip (and transformers, through it) takes seconds to import: load the model side on first use,
# so that `coca --help`, the search service and clients that only need errors or settings start fast.
_LAZY = {
    "load": "runtime", "from_reference": "runtime", "Coca": "runtime", "Caption": "captions",
    "create_open_clip": "loading", "coca_model_names": "loading", "SamplingParams": "settings",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'coca' has no attribute {name!r}")

__all__ = [
    "load", "from_reference", "create_open_clip", "coca_model_names", "Coca", "Caption", "SamplingParams",
    "CocaError", "InvalidInputError", "InvalidImageError", "InvalidVideoError", "InvalidTextError",
    "UnknownModelError", "WeightsUnavailableError", "CapacityError", "GenerationError",
]
