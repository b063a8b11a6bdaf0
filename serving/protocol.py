"""What the CoCa Triton models, their client and the repository writer agree on: names, identity,
dtypes, error wording.

Imported by all three sides (serving.models inside the server, serving.client outside,
serving.repository writing the repository).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IMAGE_ENCODER, TEXT_ENCODER, TEXT_DECODER = "coca_image_encoder", "coca_text_encoder", "coca_text_decoder"
TRITON_MODELS = {  # Triton model name -> CoCa part it serves (coca.loading.PARTS)
    IMAGE_ENCODER: "image_encoder",
    TEXT_ENCODER: "text_encoder",
    TEXT_DECODER: "text_decoder",
}
# Optional: the decoder with iterative scheduling (decoupled, one streamed request per caption), in a
# repository exported with `--decoder-scheduler iterative`; it serves the text_decoder part too.
CAPTIONER = "coca_captioner"
DECODER_SCHEDULERS = ("sequence", "iterative")  # coca_text_decoder's step protocol; coca_captioner
WEIGHTS_FILE = "weights.safetensors"  # in <model>/<version>/, beside model.py
ONNX_FILE = "model.onnx"  # an encoder's ONNX graph (`coca export --format onnx`), beside its weights
PARAMETER_PREFIX = "coca_"


@dataclass(frozen=True)
class Identity:
    """Which model and weights a repository holds; the same in every model's config."""

    model: str
    pretrained: str
    dtype: str
    embed_dim: int
    repository_id: str  # hash of all parts' weights: equal ids, equal weights
    # "encoders int8, decoder fp32 (auto)" (coca/precision.py summary); not part of equality: the same
    # weights at another precision are the same export to a store; "" from repositories written before it
    precision: str = field(default="", compare=False)

    def parameters(self) -> dict[str, str]:
        return {PARAMETER_PREFIX + k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "Identity":
        """From a model config's parameters (values as strings); KeyError if one is missing."""
        values = {name: parameters[PARAMETER_PREFIX + name] for name in cls.__dataclass_fields__ if name != "precision"}
        values["precision"] = parameters.get(PARAMETER_PREFIX + "precision", "")
        return cls(**{**values, "embed_dim": int(values["embed_dim"])})


# SamplingParams field -> (decoder input sent with START, its numpy dtype)
SAMPLING_INPUTS = {
    "temperature": ("TEMPERATURE", np.float32),
    "top_k": ("TOP_K", np.int32),
    "top_p": ("TOP_P", np.float32),
    "repetition_penalty": ("REPETITION_PENALTY", np.float32),
    "min_tokens": ("MIN_TOKENS", np.int32),
    "max_tokens": ("MAX_TOKENS", np.int32),
    "num_beams": ("NUM_BEAMS", np.int32),
    "num_beam_groups": ("NUM_BEAM_GROUPS", np.int32),
    "seed": ("SEED", np.int64),
}
# What the caption loop asks of each step: every output tensor costs the Python backend a shared-memory
# round of its own per request (16 requests per execute at concurrency 16), so TOKEN and LOGPROB, which
# TOKENS and LOGPROBS already hold, are not asked for.
STEP_OUTPUTS = ("DONE", "TOKENS", "LOGPROBS", "BATCH_ROWS")
# What a streamed caption asks of each of coca_captioner's responses (the last one's TOKENS and
# LOGPROBS are the caption's: a beam search has its tokens only then). TOKEN and LOGPROB are the last
# of TOKENS and LOGPROBS: not asked for, as every output costs a shared-memory round per response.
STREAM_OUTPUTS = ("TEXT", "TOKENS", "LOGPROBS", "DONE", "BATCH_ROWS")

# The decoder answers a full cache with UNAVAILABLE and this message start (coca's CapacityError);
# the client tells it from a connection failure, also UNAVAILABLE, by these words.
CAPACITY_MESSAGE = "decoder cache full"
