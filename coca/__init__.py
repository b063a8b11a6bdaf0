"""coca: the one CoCa (Contrastive Captioner) implementation of coca-search.

    import coca
    model = coca.load("coca_ViT-B-32", pretrained="laion2b_s13b_b90k")   # or a file, or "random"
    model.caption(["photo.jpg"])[0].text
    model.embed_images(["photo.jpg"]), model.embed_texts(["a dog"])
"""
from .errors import (
    CapacityError, CocaError, InvalidImageError, InvalidInputError, InvalidTextError,
    InvalidVideoError, UnknownModelError, WeightsUnavailableError,
)
from .loading import coca_model_names, create_open_clip
from .runtime import Caption, Coca, from_reference, load
from .sampling import SamplingParams

__all__ = [
    "load", "from_reference", "create_open_clip", "coca_model_names", "Coca", "Caption", "SamplingParams",
    "CocaError", "InvalidInputError", "InvalidImageError", "InvalidVideoError", "InvalidTextError",
    "UnknownModelError", "WeightsUnavailableError", "CapacityError",
]
