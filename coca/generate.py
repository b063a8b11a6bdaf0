"""Caption generation over the KV cache: prefill, decode one token, repeat.

`generate` is the cached loop; `generate_uncached` reruns the whole prefix every
step (open_clip's way) through the same modules, as the reference that cached
generation must equal. `beam_search` follows open_clip's group beam search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import CoCa
from .sampling import EOT, PAD, SOT, RowParams, SamplingParams, choose, ban_early_end, penalise_repeats


@dataclass
class Generated:
    tokens: list[int]  # after SOT, ending with EOT (or PAD, which also ends a sequence)
    logprobs: list[float]  # model log-probability of each token (0 for a forced EOT)


def _finish(history: torch.Tensor, logprobs: list[torch.Tensor]) -> list[Generated]:
    out = []
    lp = torch.stack(logprobs, dim=1) if logprobs else torch.zeros(history.shape[0], 0)
    for row, row_lp in zip(history[:, 1:].tolist(), lp.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in (EOT, PAD)), len(row))
        row_lp += [0.0] * (end - len(row_lp))  # a forced EOT was not sampled
        out.append(Generated(row[:end], row_lp[:end]))
    return out


@torch.inference_mode()
def generate(net: CoCa, image_embs: torch.Tensor, params: SamplingParams) -> list[Generated]:
    """Cached generation for a batch of images (B, N, W), all with the same settings."""
    if params.num_beams > 1:
        return beam_search(net, image_embs, params)
    batch = image_embs.shape[0]
    rows = RowParams.stack([params] * batch)
    cache = net.new_cache(batch, max_len=max(params.max_tokens, 1))
    net.start_sequences(cache, slice(0, batch), image_embs)
    history = torch.full((batch, 1), SOT)
    done = torch.zeros(batch, dtype=torch.bool)
    logprobs = []
    for step in range(params.max_tokens - 1):
        active = (~done).nonzero()[:, 0]
        slots = slice(0, batch) if len(active) == batch else active  # finished rows stop computing
        logits = net.decode(history[active, -1:], torch.full((len(active),), step), cache, slots)[:, -1]
        step_rows = rows if len(active) == batch else rows.select(active.tolist())
        tokens, lp = choose(logits, history[active], torch.full((len(active),), step), step_rows)
        history, done = _append(history, done, active, tokens)
        logprobs.append(torch.zeros(batch).index_put_((active,), lp))
        if done.all():
            break
    else:
        history, _ = _append(history, done, (~done).nonzero()[:, 0], torch.full((int((~done).sum()),), EOT))
    return _finish(history, logprobs)


def _append(history, done, active, tokens):
    """Add one column: the chosen tokens for active rows, PAD for finished ones."""
    column = torch.full((history.shape[0],), PAD)
    column[active] = tokens
    done = done | (column == EOT) | (column == PAD)
    return torch.cat([history, column[:, None]], dim=1), done


@torch.inference_mode()
def generate_uncached(net: CoCa, image_embs: torch.Tensor, params: SamplingParams) -> list[Generated]:
    """Reference loop: every step re-reads the whole prefix (no cache carried between steps)."""
    batch = image_embs.shape[0]
    rows = RowParams.stack([params] * batch)
    history = torch.full((batch, 1), SOT)
    done = torch.zeros(batch, dtype=torch.bool)
    logprobs = []
    for step in range(params.max_tokens - 1):
        active = (~done).nonzero()[:, 0]
        logits = net.teacher_forced_logits(image_embs[active], history[active])[:, -1]
        tokens, lp = choose(logits, history[active], torch.full((len(active),), step), rows.select(active.tolist()))
        history, done = _append(history, done, active, tokens)
        logprobs.append(torch.zeros(batch).index_put_((active,), lp))
        if done.all():
            break
    else:
        history, _ = _append(history, done, (~done).nonzero()[:, 0], torch.full((int((~done).sum()),), EOT))
    return _finish(history, logprobs)


@torch.inference_mode()
def beam_search(net: CoCa, image_embs: torch.Tensor, params: SamplingParams) -> list[Generated]:
    """open_clip's group beam search (scores are summed raw logits), over the KV cache.

    Beams of one image share its embeddings; after each step the self-attention
    caches are reordered to follow the surviving beams.
    """
    from transformers.generation import BeamSearchScorer  # open_clip's own scorer

    batch, beams, groups = image_embs.shape[0], params.num_beams, params.num_beam_groups
    sub = beams // groups
    rows = batch * beams
    cache = net.new_cache(rows, max_len=params.max_tokens + 1)
    slots = slice(0, rows)
    net.start_sequences(cache, slots, image_embs.repeat_interleave(beams, dim=0))
    scorer = BeamSearchScorer(batch_size=batch, num_beams=beams, device="cpu", num_beam_groups=groups)
    input_ids = torch.full((rows, 1), SOT)
    scores = torch.full((batch, beams), -1e9)
    scores[:, ::sub] = 0  # first beam of each group starts; the rest wait (as open_clip)
    scores = scores.view(-1)
    min_tokens = torch.full((rows,), params.effective_min_tokens)
    penalty = torch.full((rows,), params.repetition_penalty)
    while True:
        step = input_ids.shape[1] - 1
        logits = net.decode(input_ids[:, -1:], torch.full((rows,), step), cache, slots)[:, -1]
        logits = ban_early_end(logits, torch.full((rows,), step), min_tokens)
        logits = penalise_repeats(logits, input_ids, penalty)
        current = torch.zeros(rows, dtype=torch.long)
        reorder = torch.zeros(rows, dtype=torch.long)
        for group in range(groups):
            start = group * sub
            idx = [b * beams + i for b in range(batch) for i in range(start, start + sub)]
            group_ids = input_ids[idx]
            vocab = logits.shape[-1]
            group_scores = (logits[idx] + scores[idx, None]).view(batch, sub * vocab)
            top_scores, top = group_scores.topk(2 * sub, dim=1, largest=True, sorted=True)
            out = scorer.process(
                group_ids, top_scores, top % vocab, top // vocab,
                pad_token_id=PAD, eos_token_id=torch.tensor([EOT]), group_index=group,
            )
            scores[idx] = out["next_beam_scores"]
            beam_idx = out["next_beam_indices"]
            input_ids[idx] = group_ids[beam_idx]
            current[idx] = out["next_beam_tokens"]
            reorder[idx] = beams * (beam_idx // sub) + start + beam_idx % sub
        cache.reorder(slots, reorder)
        input_ids = torch.cat([input_ids, current[:, None]], dim=1)
        if scorer.is_done or input_ids.shape[1] >= params.max_tokens + 1:
            break
    final = scorer.finalize(
        input_ids, scores, None, None, pad_token_id=PAD, eos_token_id=torch.tensor([EOT]),
        max_length=params.max_tokens + 1,
    )["sequences"]
    return [Generated(g.tokens, [0.0] * len(g.tokens)) for g in _finish(final, [])]
