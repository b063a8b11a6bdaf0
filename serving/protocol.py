"""What the CoCa Triton models and their client agree on: names, dtypes, error wording.

Imported by both sides (serving.models inside the server, serving.client outside).
"""
from __future__ import annotations

import numpy as np

IMAGE_ENCODER, TEXT_ENCODER, TEXT_DECODER = "coca_image_encoder", "coca_text_encoder", "coca_text_decoder"

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

# The decoder answers a full cache with UNAVAILABLE and this message start (coca's CapacityError);
# the client tells it from a connection failure, also UNAVAILABLE, by these words.
CAPACITY_MESSAGE = "decoder cache full"
