"""The Triton model repository a search service runs on, exported once and reused."""
from __future__ import annotations

import json
from pathlib import Path

MARKER = "search_export.json"  # beside the repository: what was exported, and the logit scale Triton does not serve


def ensure_repository(directory: str | Path, model: str, pretrained: str, seed: int = 0,
                      dtype: str = "float32", encoders=None) -> tuple[Path, float]:
    """`directory` as a model repository of this model and weights (exported now unless it already is).

    encoders: a coca.export.EncoderSettings (default: torch, fp32).
    Returns the repository and the model's logit scale (Classify's softmax scale).
    """
    repository = Path(directory)
    marker = repository.parent / f"{repository.name}.{MARKER}"
    wanted = {"model": model, "pretrained": pretrained, "seed": seed, "dtype": dtype}
    # torch encoders are recorded as None, so markers written before this key existed still match
    use_onnx = encoders is not None and encoders.runtime != "torch"
    wanted["encoders"] = [encoders.runtime, encoders.precision] if use_onnx else None
    if marker.is_file() and (repository / "coca_manifest.json").is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in wanted} == wanted:
            return repository, float(recorded["logit_scale"])
    import coca
    from coca.export import export_repository

    print(f"exporting {model} ({pretrained}) to {repository} ...", flush=True)
    loaded = coca.load(model, pretrained=pretrained, seed=seed, dtype=dtype)
    repository.mkdir(parents=True, exist_ok=True)
    export_repository(loaded, repository, **({"encoders": encoders} if encoders is not None else {}))
    marker.write_text(json.dumps({**wanted, "logit_scale": loaded.logit_scale}, indent=2) + "\n")
    return repository, loaded.logit_scale
