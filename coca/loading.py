"""Build CoCa from open_clip names and tags, a local checkpoint, or random weights.

open_clip stays the loader (hub download, checkpoint conversion,
`weights_only=True`); we then move its state dict into our modules, whose
parameter names are open_clip's own. Each part's weights also go out to a
safetensors file and back (`save_part`, `load_part`: what a served part loads).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

import open_clip
import torch

from .errors import UnknownModelError, WeightsUnavailableError
from .config import CocaConfig
from .model import CoCa

CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM = "random"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

open_clip.add_model_config(CONFIG_DIR)  # registers coca-tiny with open_clip's factory


def coca_model_names() -> list[str]:
    return [n for n in open_clip.list_models() if "multimodal_cfg" in (open_clip.get_model_config(n) or {})]


def model_config(model_name: str) -> CocaConfig:
    """The config of a CoCa model open_clip (or coca/model_configs) knows by name; UnknownModelError otherwise."""
    if model_name not in coca_model_names():
        raise UnknownModelError(
            f"unknown model {model_name!r}: CoCa models are {', '.join(coca_model_names())}"
        )
    return CocaConfig.from_dict(open_clip.get_model_config(model_name))


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnknownModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The name `resolve_dtype` reads back: float32, bfloat16."""
    return str(dtype).removeprefix("torch.")


def is_checkpoint_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES) or Path(pretrained).exists()


def create_open_clip(model_name: str, pretrained: str = RANDOM, seed: int = 0) -> torch.nn.Module:
    """open_clip's own CoCa with the requested weights: the reference our tests compare against."""
    model_config(model_name)
    if pretrained == RANDOM:
        torch.manual_seed(seed)  # random init is a pure function of the seed
        model = open_clip.create_model(model_name, pretrained=None).eval()
        # open_clip never initialises the decoder's vocabulary projection (MultimodalTransformer
        # skips init_parameters), leaving torch.empty garbage: give it the init it was meant to get.
        projection = model.text_decoder.text_projection
        torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
        return model
    if is_checkpoint_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsUnavailableError(f"{pretrained}: checkpoint file not found")
        return open_clip.create_model(model_name, pretrained=str(path), weights_only=True).eval()
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise UnknownModelError(
            f"unknown pretrained tag {pretrained!r} for {model_name}: "
            f"use one of {', '.join(tags) or '(none)'}, a checkpoint file, or 'random'"
        )
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, weights_only=True).eval()
    except Exception as exc:  # hub unreachable, no cached copy, ...
        raise WeightsUnavailableError(
            f"cannot get the {model_name} weights {pretrained!r} ({type(exc).__name__}: {exc}); "
            f"offline, use pretrained='random' (random weights from a seed) "
            f"or the path of a local checkpoint file (.safetensors/.bin/.pt)"
        ) from exc


def from_open_clip(model_name: str, reference: torch.nn.Module, dtype=torch.float32, device="cpu") -> CoCa:
    """Our CoCa holding the reference's weights (shared storage: no copy for fp32 on the CPU)."""
    net = CoCa(model_config(model_name))
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("attn_mask")}
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device=device, dtype=resolve_dtype(dtype)).eval().requires_grad_(False)


# The top-level CoCa modules (open_clip state-dict prefixes) each served part needs.
PARTS = {
    "image_encoder": ("visual",),
    "text_encoder": ("text",),
    "text_decoder": ("text", "text_decoder"),  # the decoder reads the text tower's token outputs
}


def part_modules(part: str) -> tuple[str, ...]:
    if part not in PARTS:
        raise UnknownModelError(f"unknown CoCa part {part!r}: use one of {', '.join(PARTS)}")
    return PARTS[part]


def part_state_dict(net: CoCa, part: str) -> dict[str, torch.Tensor]:
    """The weights of one part, under their open_clip names."""
    modules = part_modules(part)
    return {k: v for k, v in net.state_dict().items() if k.split(".", 1)[0] in modules}


def load_part(model_name: str, part: str, weights_file: Union[str, Path], dtype=None, device="cpu") -> CoCa:
    """CoCa holding only `part`'s weights, read from a safetensors file (never pickle).

    The net is built on the meta device, so the other parts cost no memory; their
    tensors stay on `meta` and must not be used. `dtype` None keeps the file's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with torch.device("meta"):
        net = CoCa(model_config(model_name))
    expected = set(part_state_dict(net, part))
    try:
        state = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise WeightsUnavailableError(f"cannot read the {part} weights {weights_file}: {exc}") from exc
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{weights_file} does not hold the {model_name} {part}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        net.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch: weights of another model size
        raise WeightsUnavailableError(f"{weights_file} does not fit {model_name}: {exc}") from exc
    for name in part_modules(part):
        module = getattr(net, name)
        module.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        module.requires_grad_(False)
    return net.eval()


def save_part(net: CoCa, part: str, path: Union[str, Path], dtype: torch.dtype, about: dict) -> str:
    """Write one part's weights (open_clip names) as a safetensors file; return its sha256.

    `about` (JSON-able) is stored as the file's one metadata key. The file appears whole or not at all.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.to(dtype).contiguous() for k, v in part_state_dict(net, part).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # One metadata key: safetensors writes several in random order, and the file's sha256 must be repeatable.
    save_file(state, str(tmp), metadata={"coca": json.dumps({**about, "part": part}, sort_keys=True)})
    os.replace(tmp, path)  # a reader never sees half a file
    return file_sha256(path)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
