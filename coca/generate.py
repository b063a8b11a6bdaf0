"""Caption generation for a batch of images, in process.

`generate` is the cached loop (the `Decoder` of decoding.py, the same one the
Triton decoder model drives); `generate_uncached` reruns the whole prefix every
step (open_clip's way) through the same modules: the reference that cached
generation must equal.
"""
from __future__ import annotations

import torch

from .decoding import NOT_A_DISTRIBUTION, Decoder, Generated, SampledSequence
from .model import CoCa
from .sampling import RowParams, SamplingParams, choose

__all__ = ["Generated", "generate", "generate_uncached"]


def generate(net: CoCa, image_embs: torch.Tensor, params: SamplingParams) -> list[Generated]:
    """Cached generation: one sequence per image (B, N, W), all with the same settings."""
    decoder = Decoder(net, capacity=image_embs.shape[0] * params.num_beams, max_len=params.max_tokens + 1)
    return decoder.run(decoder.start(image_embs, params))


@torch.inference_mode()
def generate_uncached(net: CoCa, image_embs: torch.Tensor, params: SamplingParams) -> list[Generated]:
    """Reference loop: every step re-reads the whole prefix (no cache carried between steps)."""
    sequences = [SampledSequence(params, slot) for slot in range(image_embs.shape[0])]
    while live := [i for i, s in enumerate(sequences) if not s.done]:
        history = torch.tensor([sequences[i].history() for i in live])  # equal lengths: all started together
        logits = net.teacher_forced_logits(image_embs[live], history.to(net.device))[:, -1].cpu()
        tokens, logprobs, failed = choose(
            logits, history, torch.full((len(live),), history.shape[1] - 1),
            RowParams.cat([sequences[i].row_params for i in live]),
        )
        for i, token, lp, bad in zip(live, tokens.tolist(), logprobs.tolist(), failed.tolist()):
            if bad:
                sequences[i].fail(NOT_A_DISTRIBUTION)
            else:
                sequences[i].accept(token, lp)
    return [s.result() for s in sequences]
