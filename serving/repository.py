"""Write a Triton model repository for one CoCa: three models, their weights, and who they are.

    export_repository(coca.load("coca_ViT-B-32", "random"), "model_repository")

For each Triton model the repository gets `<name>/config.pbtxt` (the template from
the git-tracked `model_repository/` folder, with this model's dims and identity
filled in), `<name>/1/model.py` (a one-line import of serving.models) and
`<name>/1/weights.safetensors` (that part's weights only, written by coca.loading).
`coca_manifest.json` at the top records the identity and each file's sha256; the
same identity goes into every config's `parameters`, where a client reads it through
Triton's model config and refuses a mismatch. Exporting into the template folder
itself works: configs are rewritten in place (their dims and coca_* parameters),
model.py stays. `ensure_repository` exports once and reuses the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from coca.errors import InvalidInputError

from .protocol import (CAPTIONER, DECODER_SCHEDULERS, IMAGE_ENCODER, ONNX_FILE, TEXT_DECODER, TEXT_ENCODER,
                       TRITON_MODELS, WEIGHTS_FILE, Identity)

# The templates: the repository's own model_repository/ folder (a git checkout of coca-search has it).
TEMPLATES = Path(__file__).resolve().parents[1] / "model_repository"
# Templates of models an export adds only on request (coca_captioner): not in model_repository/, which
# Triton (docker-compose mounts it) loads whole, so an in-place export without them stays loadable.
OPTIONAL_TEMPLATES = TEMPLATES.parent / "optional_models"
ENCODER_RUNTIMES = ("torch", "onnxruntime")
# What `coca export`, `coca serve`, `coca demo` and ensure_repository export unless told otherwise: the
# encoders' ONNX graphs in ONNX Runtime (equal to torch within 1e-5, faster) and coca_captioner beside the
# step protocol's decoder (every live caption in each forward). The old paths: --format python (coca serve:
# --encoders torch) and --decoder-scheduler sequence.
DEFAULT_ENCODER_RUNTIME = "onnxruntime"
DEFAULT_DECODER_SCHEDULER = "iterative"
MANIFEST_FILE = "coca_manifest.json"
MARKER = "search_export.json"  # beside a reused repository: what was exported, and the logit scale Triton does not serve


@dataclass(frozen=True)
class DecoderSettings:
    """Knobs of the decoder model; None keeps the template's value."""

    capacity_rows: Optional[int] = None  # KV-cache rows (a beam search takes num_beams)
    sequence_idle_s: Optional[float] = None  # Triton drops a silent sequence after this
    expiry_interval_s: Optional[float] = None  # how often the model's timer looks for idle caches
    queue_delay_us: Optional[int] = None  # how long the sequence batcher waits to fill a batch of steps
    precision: Optional[str] = None  # "fp32", "int8" or "bf16" (coca/quant.py): the decode step's arithmetic
    # "iterative": the repository also holds coca_captioner (one streamed request per caption, every live
    # caption in each forward), which clients then use for captions; export only ("sequence": it does not)
    scheduler: str = "sequence"

    def __post_init__(self):
        if self.scheduler not in DECODER_SCHEDULERS:
            raise InvalidInputError(f"unknown decoder scheduler {self.scheduler!r}: use one of {', '.join(DECODER_SCHEDULERS)}")


@dataclass(frozen=True)
class EncoderSettings:
    """How the two encoder models compute: torch (default), or their ONNX graphs in ONNX Runtime."""

    runtime: str = "torch"
    precision: str = "fp32"  # with onnxruntime: "int8" = 8-bit MatMulNBits weights (coca/onnx_encoders.py)

    def __post_init__(self):
        if self.runtime not in ENCODER_RUNTIMES:
            raise InvalidInputError(f"unknown encoder runtime {self.runtime!r}: use one of {', '.join(ENCODER_RUNTIMES)}")
        if self.precision != "fp32" and self.runtime != "onnxruntime":
            raise InvalidInputError(f"encoder precision {self.precision} needs the onnxruntime runtime (--format onnx)")


def export_repository(
    model,
    out_dir: Union[str, os.PathLike],
    dtype=None,
    decoder: DecoderSettings = DecoderSettings(),
    encoders: EncoderSettings = EncoderSettings(),
    torch_threads: Optional[int] = None,
    templates: Union[str, os.PathLike] = TEMPLATES,
    precision: Optional[dict] = None,
) -> Path:
    """Write (or refresh) a Triton model repository for `model` (a coca.Coca); return the manifest's path.

    dtype: the weights' dtype on disk and in the server (default: the model's).
    precision: the record of an automatic choice (`auto_precision`, whose settings these are); None: the
    precisions of `encoders` and `decoder` were asked for by name. The manifest keeps it whole.
    """
    from coca.loading import dtype_name, resolve_dtype, save_part  # torch + open_clip: only when exporting
    from coca.precision import fixed_precision, summary

    precision = precision or fixed_precision(encoders.precision, decoder.precision or "fp32")

    out, templates = Path(out_dir).resolve(), Path(templates).resolve()
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    about = {"model": model.model_name, "pretrained": model.pretrained}
    hashes = {name: save_part(model.net, part, out / name / "1" / WEIGHTS_FILE, dtype, about)
              for name, part in TRITON_MODELS.items()}
    identity = Identity(
        model=model.model_name, pretrained=model.pretrained, dtype=dtype_name(dtype),
        embed_dim=model.net.config.embed_dim, repository_id=repository_id(hashes),
        precision=summary(precision),
    )
    onnx_hashes = _write_onnx(model, out, encoders.precision) if encoders.runtime == "onnxruntime" else {}
    names = list(TRITON_MODELS)
    if decoder.scheduler == "iterative":  # the captioner serves the decoder's weights: the same file
        names.append(CAPTIONER)
        hashes[CAPTIONER] = _link_weights(out / TEXT_DECODER / "1" / WEIGHTS_FILE, out / CAPTIONER / "1" / WEIGHTS_FILE)
    elif (out / CAPTIONER).is_dir():  # re-exported without it: clients must not find a stale one
        shutil.rmtree(out / CAPTIONER)
    for name in names:
        template = (templates if name in TRITON_MODELS else OPTIONAL_TEMPLATES) / name
        _write_model_files(template, out / name)
        parameters = {
            **identity.parameters(),
            "coca_weights_sha256": hashes[name],
            "coca_preprocess": json.dumps(model.preprocess_cfg),
        }
        if name in (IMAGE_ENCODER, TEXT_ENCODER):
            parameters.update(runtime=encoders.runtime, precision=encoders.precision)
        if name in onnx_hashes:
            parameters["coca_onnx_sha256"] = onnx_hashes[name]
        if torch_threads is not None:
            parameters["torch_threads"] = str(torch_threads)
        config = (template / "config.pbtxt").read_text()
        config = _set_dims(config, tensor_dims(model.net)[name])
        config = _set_parameters(config, parameters)
        if name in (TEXT_DECODER, CAPTIONER):
            config = _decoder_config(config, decoder)
        _write_text(out / name / "config.pbtxt", config)
    manifest = {
        **asdict(identity),
        "precision": precision,
        "preprocess_cfg": model.preprocess_cfg,
        "models": {name: {"part": TRITON_MODELS.get(name, "text_decoder"), "weights": f"{name}/1/{WEIGHTS_FILE}",
                          "sha256": hashes[name]} for name in names},
    }
    _write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return out / MANIFEST_FILE


def auto_precision(model, encoders: EncoderSettings, decoder: DecoderSettings, index_size: Optional[int] = None,
                   features: Optional[frozenset[str]] = None) -> tuple[EncoderSettings, DecoderSettings, dict]:
    """`encoders` and `decoder` at the precision coca/precision.py chooses for this CPU (or `features`), and
    the record of that choice (pass it to export_repository). index_size: the top-10 gate's index."""
    from dataclasses import replace

    from coca.cpu import cpu_features
    from coca.precision import Calibration, choose_precision

    calibration = Calibration() if index_size is None else Calibration(index_size=index_size)
    record = choose_precision(model, cpu_features() if features is None else features, encoders.runtime, calibration)
    chosen = record["chosen"]
    return (replace(encoders, precision=chosen["encoders"]), replace(decoder, precision=chosen["decoder"]), record)


def ensure_repository(directory: Union[str, os.PathLike], model: str, pretrained: str, seed: int = 0,
                      dtype: str = "float32", encoders: Optional[EncoderSettings] = None,
                      decoder_scheduler: str = DEFAULT_DECODER_SCHEDULER) -> tuple[Path, float]:
    """`directory` as a model repository of this model and weights (exported now unless it already is).

    encoders: how the encoders compute (default: DEFAULT_ENCODER_RUNTIME, fp32); decoder_scheduler "iterative"
    adds coca_captioner. Returns the repository and the model's logit scale (Classify's softmax scale).
    """
    repository = Path(directory)
    marker = repository.parent / f"{repository.name}.{MARKER}"
    wanted = {"model": model, "pretrained": pretrained, "seed": seed, "dtype": dtype}
    encoders = encoders or EncoderSettings(DEFAULT_ENCODER_RUNTIME)
    # torch encoders are recorded as None, so markers written before this key existed still match
    use_onnx = encoders.runtime != "torch"
    wanted["encoders"] = [encoders.runtime, encoders.precision] if use_onnx else None
    wanted["decoder_scheduler"] = None if decoder_scheduler == "sequence" else decoder_scheduler  # old markers match
    wanted["templates"] = _templates_sha()  # a changed config template is exported again
    if marker.is_file() and (repository / MANIFEST_FILE).is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in wanted} == wanted:
            return repository, float(recorded["logit_scale"])
    import coca

    print(f"exporting {model} ({pretrained}) to {repository} ...", flush=True)
    loaded = coca.load(model, pretrained=pretrained, seed=seed, dtype=dtype)
    repository.mkdir(parents=True, exist_ok=True)
    export_repository(loaded, repository, encoders=encoders,
                      decoder=DecoderSettings(scheduler=decoder_scheduler))
    marker.write_text(json.dumps({**wanted, "logit_scale": loaded.logit_scale}, indent=2) + "\n")
    return repository, loaded.logit_scale


def _templates_sha() -> str:
    files = sorted(p for folder in (TEMPLATES, OPTIONAL_TEMPLATES) for p in folder.glob("*/config.pbtxt"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]


def read_manifest(repository: Union[str, os.PathLike]) -> dict:
    path = Path(repository) / MANIFEST_FILE
    if not path.is_file():
        raise InvalidInputError(f"{repository} is not an exported CoCa model repository (no {MANIFEST_FILE}); "
                                f"run `coca export --out {repository}` first")
    return json.loads(path.read_text())


def repository_id(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(hashes[name] for name in sorted(hashes)).encode()).hexdigest()[:16]


def tensor_dims(net) -> dict[str, dict[str, list[int]]]:
    """Per Triton model, the dims (without batch) of its model-specific tensors."""
    queries, width = net.visual.attn_pool.query.shape  # query 0 pools, the others feed the decoder
    heads = net.visual.transformer.resblocks[-1].attn.heads
    patches = net.visual.grid ** 2 + 1
    embed = net.config.embed_dim
    return {
        IMAGE_ENCODER: {"CLASS_EMBEDDING": [embed], "IMAGE_EMBEDDINGS": [queries - 1, width],
                        "ATTENTION": [heads, patches, patches]},
        TEXT_ENCODER: {"CLASS_EMBEDDING": [embed]},
        TEXT_DECODER: {"IMAGE_EMBEDDINGS": [-1, width]},
        CAPTIONER: {"IMAGE_EMBEDDINGS": [1, -1, width]},  # no batching by Triton: one caption per request
    }


# --- files -------------------------------------------------------------------------------
def _write_onnx(model, out: Path, precision: str) -> dict[str, str]:
    """Each encoder's ONNX graph as <model>/1/model.onnx; returns their sha256 by Triton model."""
    from coca.loading import file_sha256
    from coca.onnx_encoders import IMAGE_FILE, TEXT_FILE, write_onnx_encoders

    # scratch inside a model's folder, not the repository root: a leftover (a killed export) must not
    # look like a model to Triton, which ignores non-numeric folders inside a model
    with tempfile.TemporaryDirectory(dir=out / "coca_text_encoder", prefix=".onnx-") as tmp:
        files = write_onnx_encoders(model, tmp, precision)
        hashes = {}
        for name, file in (("coca_text_encoder", TEXT_FILE), ("coca_image_encoder", IMAGE_FILE)):
            target = out / name / "1" / ONNX_FILE
            os.replace(files[file], target)  # a server never sees half a file
            hashes[name] = file_sha256(target)
    return hashes


def _check_precision(precision: str) -> str:
    from coca.quant import check_precision  # torch: only when configuring a precision

    return check_precision(precision)


def _link_weights(source: Path, target: Path) -> str:
    """`target` as a hard link to `source` (a copy where links fail); returns its sha256."""
    from coca.loading import file_sha256

    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target.is_file() and os.path.samefile(source, target)):
        scratch = target.with_suffix(".tmp")
        scratch.unlink(missing_ok=True)
        try:
            os.link(source, scratch)
        except OSError:
            shutil.copyfile(source, scratch)
        os.replace(scratch, target)
    return file_sha256(target)


def _write_model_files(template: Path, dest: Path):
    """model.py from the template, unless exporting in place."""
    source = template / "1" / "model.py"
    if not source.is_file():
        raise InvalidInputError(f"Triton model template {source} is missing (a git checkout of coca-search has it)")
    target = dest / "1" / "model.py"
    if target.resolve() != source.resolve():
        shutil.copyfile(source, target)


def _write_text(path: Path, text: str):
    if path.is_file() and path.read_text() == text:
        return
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


# --- config.pbtxt edits (text, so comments and layout survive; every edit is idempotent) ---
def configure_decoder(repository: Union[str, os.PathLike], settings: DecoderSettings):
    """Change the decoder's knobs in an exported repository (weights untouched); restart Triton after.
    The captioner, where the repository has it, gets the same capacity and precision."""
    for name in (TEXT_DECODER, CAPTIONER):
        path = Path(repository) / name / "config.pbtxt"
        if path.is_file():
            _write_text(path, _decoder_config(path.read_text(), settings))


def _decoder_config(config: str, settings: DecoderSettings) -> str:
    values = {"capacity_rows": settings.capacity_rows, "precision": settings.precision and _check_precision(settings.precision)}
    if "sequence_batching" not in config:  # the captioner: no sequences, no idle expiry
        return _set_parameters(config, {k: str(v) for k, v in values.items() if v is not None})
    values["expiry_interval_seconds"] = settings.expiry_interval_s
    if settings.sequence_idle_s is not None:  # the model's TTL: a bit after Triton forgets the sequence
        values["sequence_ttl_seconds"] = settings.sequence_idle_s + max(0.5, 0.2 * settings.sequence_idle_s)
        config = _set_number(config, "max_sequence_idle_microseconds", round(settings.sequence_idle_s * 1e6))
    if settings.queue_delay_us is not None:
        config = _set_number(config, "max_queue_delay_microseconds", settings.queue_delay_us)
    return _set_parameters(config, {k: str(v) for k, v in values.items() if v is not None})


_PARAMETER = r'parameters\s*\{\s*key:\s*"(%s)"\s*value:\s*\{\s*string_value:\s*("(?:[^"\\]|\\.)*")\s*\}\s*\}'


def config_parameters(config: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt (as written by this module)."""
    return {key: json.loads(value) for key, value in re.findall(_PARAMETER % '[^"]+', config)}


def _set_parameters(config: str, parameters: dict[str, str]) -> str:
    for key, value in parameters.items():
        entry = f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
        pattern = re.compile(_PARAMETER % re.escape(key))
        if pattern.search(config):
            config = pattern.sub(lambda _: entry, config)
        else:
            config = config.rstrip("\n") + "\n" + entry + "\n"
    return config


def _set_dims(config: str, dims: dict[str, list[int]]) -> str:
    for tensor, shape in dims.items():
        pattern = re.compile(r'(\{\s*name:\s*"' + re.escape(tensor) + r'"[^}]*?dims:\s*\[)[^\]]*(\])')
        if not pattern.search(config):
            raise InvalidInputError(f"config template has no tensor {tensor} with dims")
        config = pattern.sub(lambda m: m.group(1) + " " + ", ".join(map(str, shape)) + " " + m.group(2), config)
    return config


def _set_number(config: str, field: str, value: int) -> str:
    return re.sub(r"(\b" + re.escape(field) + r":\s*)\d+", lambda m: m.group(1) + str(value), config)
