"""Triton model coca_text_decoder: one caption per sequence, every step of a batch in one forward.

Protocol (sequence batcher, `oldest` strategy; see model_repository/coca_text_decoder/config.pbtxt):
START carries IMAGE_EMBEDDINGS (1, 255, W) and optional sampling inputs; every request,
START included, advances its caption by one token and answers TOKEN, LOGPROB, DONE,
TOKENS, LOGPROBS, BATCH_ROWS (and STATS on request). A request with END computes nothing: it
frees the sequence, and answers TEXT, the finished caption read by the model's tokenizer (so
clients need no tokenizer). A step asked for TEXT_SO_FAR also answers the text so far (a stream
shows it as it grows): never a text that later tokens change, the finished caption once DONE. START+END without IMAGE_EMBEDDINGS is a probe: it answers STATS
(and DONE) and starts nothing. A finished caption gives its cache rows back at once; until END
its requests just answer DONE with the final TOKENS and LOGPROBS.

Memory: a `coca.decoding.Decoder` preallocates `capacity_rows` KV-cache rows; a full
cache answers START with UNAVAILABLE ("decoder cache full ..."). Sequences idle longer
than `sequence_ttl_seconds` are freed at the next execute() and by a timer thread.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch

from coca.decoding import BeamSequence, Decoder, Generated, Sequence
from coca.errors import CapacityError
from coca.sampling import SamplingParams
from serving.protocol import SAMPLING_INPUTS

from .common import CocaModel, RequestError
from .sequences import RepeatingTimer, SequenceTable

START, END = 1, 2  # request.flags() bits (TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END)


class Probe:
    """What a stats probe (START+END, no IMAGE_EMBEDDINGS) gets: a finished, empty caption."""

    done = True
    error = None

    def __init__(self):
        self.rows: list[int] = []

    def result(self) -> Generated:
        return Generated([], [])


class TextDecoderModel(CocaModel):
    part = "text_decoder"

    def setup(self):
        import transformers.generation  # noqa: F401  beam search's scorer: import now, not in a request
        from coca.quant import quantize

        quantize(self.coca.net, self.parameters.get("precision", "fp32"))  # opt-in int8 (coca/quant.py)
        self.decoder = Decoder(self.coca.net, capacity=int(self.parameters.get("capacity_rows", "64")))
        cross = self.decoder.cache.cross[0].k  # (capacity, heads, image tokens, head dim)
        self.embeddings_shape = (1, cross.shape[2], self.coca.net.text_decoder.ln_final.normalized_shape[0])
        self.sequences: SequenceTable[Sequence] = SequenceTable(float(self.parameters["sequence_ttl_seconds"]))
        self.expired = {"execute": 0, "timer": 0}
        self.lock = threading.Lock()  # execute() and the expiry timer
        interval = float(self.parameters.get("expiry_interval_seconds", "1"))
        self.timer = RepeatingTimer(interval, self._expire_from_timer, name=f"{self.name}-expiry")
        self.log_info(f"{self.name}: {getattr(self.coca.net, 'precision', 'fp32')}, {self.decoder.capacity} cache rows, {self.decoder.cache.nbytes() / 2**20:.0f} MiB; "
                      f"sequences expire after {self.sequences.ttl_s:g} s idle")

    def finalize(self):
        self.timer.stop()

    # --- one execute(): at most one request per sequence --------------------------------
    def run(self, requests: list) -> list:
        with self.lock:
            self._expire_idle("execute")
            sequences = self.prepare_each(requests, self._sequence_for)
            ending = [bool(r.flags() & END) for r in requests]
            stepping = [s for s, end in zip(sequences, ending) if not isinstance(s, RequestError) and not s.done and not end]
            rows = self._step(stepping, sequences)
            for request, sequence, end in zip(requests, sequences, ending):
                if not isinstance(sequence, RequestError) and (sequence.done or end):
                    self.decoder.release(sequence)  # a finished caption's rows are free at once
                if end:
                    self.sequences.pop(request.correlation_id())
            stats = self.stats()
            return [self.respond(self._outputs(r, s, rows, stats)) for r, s in zip(requests, sequences)]

    def _sequence_for(self, request) -> Sequence:
        key, now = request.correlation_id(), time.monotonic()
        if request.flags() == START | END and self.input(request, "IMAGE_EMBEDDINGS") is None:
            return Probe()
        if request.flags() & START:
            self._forget(key)  # an id that starts again starts afresh
            sequence = self._start(request)
            self.sequences.add(key, sequence, now)
            return sequence
        sequence = self.sequences.touch(key, now)
        if sequence is None:
            raise RequestError(
                f"unknown sequence {key}: it was never started here, was ended, or was freed after "
                f"{self.sequences.ttl_s:g} s idle; start it again with the START flag", "NOT_FOUND")
        return sequence

    def _start(self, request) -> Sequence:
        embeddings = self.input(request, "IMAGE_EMBEDDINGS")
        if embeddings is None:
            raise RequestError("a START request needs IMAGE_EMBEDDINGS (the image encoder's output)")
        if embeddings.shape != self.embeddings_shape:
            raise RequestError(f"IMAGE_EMBEDDINGS must have shape {list(self.embeddings_shape)} "
                               f"(batch 1, one row per image token), got {list(embeddings.shape)}")
        if not np.isfinite(embeddings).all():
            raise RequestError("IMAGE_EMBEDDINGS holds NaN or infinite values")
        params = SamplingParams.from_float32(self._sampling_values(request))  # InvalidInputError says what is wrong
        try:
            [sequence] = self.decoder.start(torch.tensor(embeddings), params)
        except CapacityError as exc:
            raise RequestError(f"{exc} ({len(self.sequences)} live sequences)", "UNAVAILABLE") from exc
        return sequence

    def _sampling_values(self, request) -> dict:
        values = {}
        for field, (name, dtype) in SAMPLING_INPUTS.items():
            array = self.input(request, name)
            if array is not None:
                values[field] = float(array.item()) if np.issubdtype(dtype, np.floating) else int(array.item())
        return values

    def _step(self, stepping: list[Sequence], sequences: list) -> int:
        """All stepping sequences in ONE batched forward; on failure their requests fail alone."""
        # in slot order: when the rows form one run, the cache is read as views instead of gathered
        stepping = sorted(stepping, key=lambda s: s.rows[0])
        try:
            return self.decoder.step(stepping)
        except Exception as exc:
            self.log_error(f"{self.name}: decode step failed: {type(exc).__name__}: {exc}")
            failed = RequestError(f"decode step failed: {type(exc).__name__}: {exc}", "INTERNAL")
            for i, sequence in enumerate(sequences):
                if any(sequence is s for s in stepping):
                    self.decoder.release(sequence)
                    sequences[i] = failed
            return 0

    def _outputs(self, request, sequence, rows: int, stats: dict):
        if isinstance(sequence, RequestError):
            return sequence
        if sequence.error is not None:  # this caption failed alone; its neighbours went on
            return RequestError(str(sequence.error))
        result = sequence.result() if sequence.done or not isinstance(sequence, BeamSequence) else None
        tokens, logprobs = (result.tokens, result.logprobs) if result else ([], [])
        outputs = {
            "TOKEN": np.array([[tokens[-1] if tokens else -1]], np.int64),
            "LOGPROB": np.array([[logprobs[-1] if logprobs else 0.0]], np.float32),
            "DONE": np.array([[sequence.done]], np.bool_),
            "TOKENS": np.array([tokens], np.int64).reshape(1, -1),
            "LOGPROBS": np.array([logprobs], np.float32).reshape(1, -1),
            "BATCH_ROWS": np.array([[rows]], np.int32),
            "STATS": np.array([[json.dumps(stats).encode()]], np.object_),
        }
        wanted = set(request.requested_output_names())
        if "TEXT" in wanted:
            text = self.coca.decode_text(tokens) if sequence.done else ""
            outputs["TEXT"] = np.array([[text.encode()]], np.object_)
        if "TEXT_SO_FAR" in wanted:  # a stream's step: what later tokens cannot change (coca.runtime.text_so_far)
            text = self.coca.decode_text(tokens) if sequence.done else self.coca.text_so_far(tokens)
            outputs["TEXT_SO_FAR"] = np.array([[text.encode()]], np.object_)
        return {name: value for name, value in outputs.items() if name in wanted}

    # --- memory ------------------------------------------------------------------------
    def _forget(self, key):
        sequence = self.sequences.pop(key)
        if sequence is not None:
            self.decoder.release(sequence)

    def _expire_idle(self, by: str):
        idle = self.sequences.pop_idle(time.monotonic())
        for _, sequence in idle:
            self.decoder.release(sequence)
        if idle:
            self.expired[by] += len(idle)
            self.log_info(f"{self.name}: freed {len(idle)} sequence(s) idle over {self.sequences.ttl_s:g} s "
                          f"(by {by}): {json.dumps(self.stats())}")

    def _expire_from_timer(self):
        try:
            with self.lock:
                self._expire_idle("timer")
        except Exception as exc:  # keep the timer alive; the next execute() expires too
            self.log_error(f"{self.name}: expiry timer: {type(exc).__name__}: {exc}")

    def stats(self) -> dict:
        capacity, free = self.decoder.capacity, len(self.decoder.pool.free)
        cache_bytes = self.decoder.cache.nbytes()
        return {
            "live_sequences": len(self.sequences),
            "decoding_sequences": sum(1 for s in self.sequences.values() if s.rows),
            "capacity_rows": capacity,
            "free_rows": free,
            "cache_bytes": cache_bytes,
            "cache_bytes_in_use": cache_bytes * (capacity - free) // capacity,
            "expired_by_execute": self.expired["execute"],
            "expired_by_timer": self.expired["timer"],
        }
