"""Many captions in flight over one preallocated KV cache.

A `Decoder` owns the cache and its slots; each caption is a `Sequence` holding
one slot (sampling) or one per beam (beam search). `Decoder.step` advances any
set of sequences, at different positions, by one token in one batched forward.
In-process generation and the Triton decoder model both drive it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .captions import Caption  # noqa: F401  re-exported: its home is torch-free
from .errors import CapacityError, GenerationError, InvalidInputError
from .model import CoCa
from .sampling import EOT, PAD, SOT, RowParams, SamplingParams, ban_early_end, choose, penalise_repeats, usable_rows


@dataclass
class Generated:
    tokens: list[int]  # after SOT, ending with EOT (or PAD, which also ends a sequence in open_clip)
    logprobs: list[float]  # model log-probability of each token (0 where not sampled: forced EOT, beams)


class SlotPool:
    """Free cache slots; hands out contiguous runs when it can (reads are then views)."""

    def __init__(self, capacity: int):
        self.free = list(range(capacity))

    def take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise CapacityError(
                f"decoder cache full: {count} slot(s) wanted, {len(self.free)} free; "
                "finish or end other captions, or raise the capacity"
            )
        self.free.sort()
        for start in range(len(self.free) - count + 1):  # first contiguous run
            if self.free[start + count - 1] - self.free[start] == count - 1:
                taken = self.free[start : start + count]
                break
        else:
            taken = self.free[:count]
        del_set = set(taken)
        self.free = [s for s in self.free if s not in del_set]
        return taken

    def give_back(self, slots: list[int]):
        self.free.extend(slots)


NOT_A_DISTRIBUTION = "its sampling distribution is NaN or infinite (settings out of range?)"


class _Sequence:
    """What both kinds of caption share: their cache rows, whether they are done, and the error that
    ended one early (its scores were not a usable distribution); `result()` raises that error."""

    rows: list[int]
    done: bool = False
    error: Optional[GenerationError] = None

    def fail(self, reason: str):
        self.error = GenerationError(f"caption failed: {reason}")
        self.done = True

    def result(self) -> Generated:
        if self.error is not None:
            raise self.error
        return self._result()

    def _result(self) -> Generated:
        raise NotImplementedError


class SampledSequence(_Sequence):
    """One caption sampled token by token (greedy when temperature is 0)."""

    def __init__(self, params: SamplingParams, slot: int):
        self.params, self.rows = params, [slot]
        self.row_params = RowParams.stack([params])
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self._force_end_if_due()

    def feed(self) -> tuple[list[int], list[int]]:
        """Token and position each row reads next."""
        return [self.tokens[-1] if self.tokens else SOT], [len(self.tokens)]

    def accept(self, token: int, logprob: float):
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.done = token in (EOT, PAD)
        self._force_end_if_due()

    def _force_end_if_due(self):
        # open_clip's rule: the last allowed token is EOS, without sampling it
        if not self.done and len(self.tokens) == self.params.max_tokens - 1:
            self.tokens.append(EOT)
            self.logprobs.append(0.0)
            self.done = True

    def history(self) -> list[int]:
        return [SOT, *self.tokens]

    def _result(self) -> Generated:
        return Generated(list(self.tokens), list(self.logprobs))


class BeamSequence(_Sequence):
    """open_clip's group beam search for one image (scores are summed raw logits)."""

    def __init__(self, params: SamplingParams, slots: list[int]):
        from transformers.generation import BeamSearchScorer  # open_clip's own scorer

        self.params, self.rows = params, slots
        beams, groups = params.num_beams, params.num_beam_groups
        self.sub = beams // groups
        self.scorer = BeamSearchScorer(batch_size=1, num_beams=beams, device="cpu", num_beam_groups=groups)
        self.input_ids = torch.full((beams, 1), SOT)
        self.scores = torch.full((beams,), -1e9)
        self.scores[:: self.sub] = 0  # first beam of each group starts, the rest wait (as open_clip)
        self._final: Optional[list[int]] = None

    def feed(self):
        n = self.input_ids.shape[0]
        return self.input_ids[:, -1].tolist(), [self.input_ids.shape[1] - 1] * n

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        """Score one step (logits (beams, V)); return, per beam, the beam whose history it continues."""
        p, beams = self.params, self.input_ids.shape[0]
        step = self.input_ids.shape[1] - 1
        logits = ban_early_end(logits, torch.full((beams,), step), torch.full((beams,), p.effective_min_tokens))
        logits = penalise_repeats(logits, self.input_ids, torch.full((beams,), p.repetition_penalty))
        vocab = logits.shape[-1]
        current = torch.zeros(beams, dtype=torch.long)
        reorder = torch.zeros(beams, dtype=torch.long)
        for group in range(p.num_beam_groups):
            idx = list(range(group * self.sub, (group + 1) * self.sub))
            group_ids = self.input_ids[idx]
            top_scores, top = (logits[idx] + self.scores[idx, None]).view(1, -1).topk(2 * self.sub, dim=1)
            out = self.scorer.process(
                group_ids, top_scores, top % vocab, top // vocab,
                pad_token_id=PAD, eos_token_id=torch.tensor([EOT]), group_index=group,
            )
            self.scores[idx] = out["next_beam_scores"]
            beam_idx = out["next_beam_indices"]
            self.input_ids[idx] = group_ids[beam_idx]
            current[idx] = out["next_beam_tokens"]
            reorder[idx] = group * self.sub + beam_idx
        self.input_ids = torch.cat([self.input_ids, current[:, None]], dim=1)
        if self.scorer.is_done or self.input_ids.shape[1] >= p.max_tokens + 1:
            self._finish()
        return reorder

    def _finish(self):
        best = self.scorer.finalize(
            self.input_ids, self.scores, None, None, pad_token_id=PAD,
            eos_token_id=torch.tensor([EOT]), max_length=self.params.max_tokens + 1,
        )["sequences"][0].tolist()[1:]
        end = next((i + 1 for i, t in enumerate(best) if t in (EOT, PAD)), len(best))
        self._final, self.done = best[:end], True

    def _result(self) -> Generated:
        return Generated(list(self._final), [0.0] * len(self._final))


Sequence = SampledSequence | BeamSequence


def as_slots(rows: list[int], device=None):
    """A slice when the rows are one contiguous run (cache reads are then views)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


@dataclass
class Decoder:
    """The decode loop's state for up to `capacity` rows (a beam search uses one row per beam)."""

    net: CoCa
    capacity: int
    max_len: Optional[int] = None
    cache: object = field(init=False)
    pool: SlotPool = field(init=False)

    def __post_init__(self):
        self.cache = self.net.new_cache(self.capacity, self.max_len)
        self.pool = SlotPool(self.capacity)

    @torch.inference_mode()
    def start(self, image_embs: torch.Tensor, params: SamplingParams) -> list[Sequence]:
        """One sequence per image (B, N, W); their cross-attention K/V are computed here, once."""
        per_image = params.num_beams
        wanted = image_embs.shape[0] * per_image
        if wanted > self.capacity:  # could never fit: a bad request, not a busy decoder
            raise InvalidInputError(
                f"{image_embs.shape[0]} caption(s) with num_beams {per_image} need {wanted} decoder cache rows, "
                f"more than this decoder has in all ({self.capacity}); use at most {self.capacity // image_embs.shape[0]} beams"
            )
        slots = self.pool.take(wanted)
        try:
            self.net.start_sequences(self.cache, as_slots(slots), image_embs.repeat_interleave(per_image, dim=0))
        except Exception:
            self.pool.give_back(slots)
            raise
        groups = [slots[i : i + per_image] for i in range(0, len(slots), per_image)]
        if per_image > 1:
            return [BeamSequence(params, g) for g in groups]
        return [SampledSequence(params, g[0]) for g in groups]

    def release(self, sequence: Sequence):
        self.pool.give_back(sequence.rows)
        sequence.rows = []

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> int:
        """Advance every unfinished sequence by one token in one forward; return the rows computed."""
        live = [s for s in sequences if not s.done]
        if not live:
            return 0
        rows, tokens, positions = [], [], []
        for s in live:
            t, p = s.feed()
            rows += s.rows
            tokens += t
            positions += p
        device = self.net.device
        logits = self.net.decode(
            torch.tensor(tokens, device=device)[:, None], torch.tensor(positions, device=device),
            self.cache, as_slots(rows, device),
        )[:, -1].cpu()  # choosing tokens is cheap and stays on the CPU, with its seeded generators
        parts = logits.split([len(s.rows) for s in live])
        for s, part in zip(live, parts):  # a broken input's NaN or inf fails its own caption only
            if not bool(usable_rows(part).all()):
                s.fail("the model's scores for it are NaN or infinite (are its image embeddings out of range?)")
        sampled = [(s, part) for s, part in zip(live, parts) if isinstance(s, SampledSequence) and not s.done]
        if sampled:
            self._choose(sampled)
        for s, part in zip(live, parts):
            if isinstance(s, BeamSequence) and not s.done:
                reorder = s.advance(part)
                rows_t = torch.tensor(s.rows, device=device)
                self.cache.reorder(rows_t, rows_t[reorder.to(device)])
        return len(rows)

    @staticmethod
    def _choose(sampled: list[tuple[SampledSequence, torch.Tensor]]):
        seqs = [s for s, _ in sampled]
        histories = [s.history() for s in seqs]
        width = max(len(h) for h in histories)
        history = torch.tensor([h + [SOT] * (width - len(h)) for h in histories])  # SOT pads: already seen
        generated = torch.tensor([len(s.tokens) for s in seqs])
        tokens, logprobs, failed = choose(
            torch.cat([part for _, part in sampled]), history, generated, RowParams.cat([s.row_params for s in seqs])
        )
        for s, token, lp, bad in zip(seqs, tokens.tolist(), logprobs.tolist(), failed.tolist()):
            if bad:
                s.fail(NOT_A_DISTRIBUTION)
            else:
                s.accept(token, lp)

    def run(self, sequences: list[Sequence]) -> list[Generated]:
        """Step until all are done, then free their slots; a failed caption raises its error (after all ran)."""
        try:
            while self.step(sequences):
                pass
            return [s.result() for s in sequences]
        finally:
            for s in sequences:
                self.release(s)
