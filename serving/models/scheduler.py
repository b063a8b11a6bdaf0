"""Iterative scheduling of captions over one `coca.decoding.Decoder` (what LLM servers call in-flight batching).

A `CaptionScheduler` owns a thread that, in each round, starts the captions that arrived since the
last round (while cache rows are free), advances EVERY live caption by one token in one batched
forward, and tells each caption's `Listener` what it got; a finished, failed or cancelled caption
leaves at once and its rows go to the next waiting one. So at concurrency 16 every forward has 16
rows, whatever order the clients' requests arrive in. No Triton here (the coca_captioner model
wires listeners to response senders), so it can be driven in process too.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from coca.decoding import BeamSequence, Decoder, Sequence
from coca.errors import CapacityError, InvalidInputError
from coca.settings import SamplingParams


@dataclass
class Step:
    """What one caption got from one forward (tokens/logprobs: the caption so far; a beam search
    has them only once done)."""

    tokens: list[int]
    logprobs: list[float]
    done: bool
    batch_rows: int


class Listener(Protocol):
    def cancelled(self) -> bool:
        """Whether the caller gave up (then the caption leaves, told only `end`)."""

    def step(self, step: Step) -> None:
        """One more token (the last call has step.done); raising drops the caption."""

    def fail(self, message: str, code: str) -> None:
        """The caption ended without a result (code: a TritonError name: INVALID_ARG, UNAVAILABLE, INTERNAL)."""

    def end(self) -> None:
        """The caption left without a last step or error (its caller gave up): close its stream. Each caption
        ends with exactly one of a done step, fail, or end (python_backend: every decoupled request's
        last response carries the FINAL flag, else the request is never released)."""


@dataclass(eq=False)
class Job:
    embeddings: torch.Tensor  # (1, image tokens, width)
    params: SamplingParams
    listener: Listener
    sequence: Optional[Sequence] = None


class CaptionScheduler:
    """Captions in flight on one decoder; see the module docstring. `max_waiting` bounds the queue of
    captions that wait for cache rows: beyond it a new caption fails at once with the capacity message."""

    def __init__(self, decoder: Decoder, max_waiting: int, log_error: Callable[[str], None] = print,
                 name: str = "caption-scheduler"):
        self.decoder = decoder
        self.max_waiting = max_waiting
        self.log_error = log_error
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.counts = collections.Counter()  # forwards, rows, round_us (time in rounds), captions by outcome
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- called from other threads --------------------------------------------------------
    def submit(self, embeddings: torch.Tensor, params: SamplingParams, listener: Listener):
        """Queue a caption; it joins the running batch at the next round."""
        wanted = params.num_beams
        if wanted > self.decoder.capacity:  # could never fit: a bad request, not a busy decoder
            raise InvalidInputError(f"num_beams {wanted} needs {wanted} decoder cache rows, more than this "
                                    f"decoder has in all ({self.decoder.capacity})")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                self.counts["refused"] += 1
                raise CapacityError(f"decoder cache full: {len(self._live)} captions decoding and "
                                    f"{len(self._waiting)} waiting for cache rows (at most {self.max_waiting})")
            self._waiting.append(Job(embeddings, params, listener))
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            live, waiting = len(self._live), len(self._waiting)
        capacity, free, cache_bytes = self.decoder.capacity, len(self.decoder.pool.free), self.decoder.cache.nbytes()
        return {
            "live_sequences": live, "waiting_sequences": waiting, "capacity_rows": capacity, "free_rows": free,
            "cache_bytes": cache_bytes, "cache_bytes_in_use": cache_bytes * (capacity - free) // capacity,
            **{name: self.counts[name] for name in ("forwards", "rows", "round_us", "finished", "failed", "cancelled", "refused")},
        }

    def stop(self, timeout: float = 10.0):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # --- the scheduler thread ---------------------------------------------------------------
    def _loop(self):
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._live:
                    self._wake.wait()
                if self._stopping:
                    break
            started = time.perf_counter_ns()
            try:
                self._round()
            except Exception as exc:  # a bug must not stop the thread: fail what is in flight
                self.log_error(f"caption scheduler round failed: {type(exc).__name__}: {exc}")
                self._fail_all(list(self._live), f"caption scheduler round failed: {type(exc).__name__}: {exc}", "INTERNAL")
            finally:
                self.counts["round_us"] += (time.perf_counter_ns() - started) // 1000
        self._fail_all([*self._live, *self._waiting], "the caption model is unloading; try again", "UNAVAILABLE")

    def _round(self):
        self._drop_cancelled()
        self._admit()
        if not self._live:
            return
        stepping = sorted(self._live, key=lambda j: j.sequence.rows[0])  # slot order: cache reads as views
        try:
            rows = self.decoder.step([j.sequence for j in stepping])
        except Exception as exc:
            self.log_error(f"decode step failed: {type(exc).__name__}: {exc}")
            self._fail_all(stepping, f"decode step failed: {type(exc).__name__}: {exc}", "INTERNAL")
            return
        if rows:
            self.counts["forwards"] += 1
            self.counts["rows"] += rows
        for job in stepping:  # also those done at start (max_tokens 1), which computed nothing
            self._report(job, rows)

    def _drop_cancelled(self):
        for job in list(self._live):
            if job.listener.cancelled():
                self._finish(job, _end, "cancelled")

    def _admit(self):
        """Start waiting captions, oldest first, while their rows are free (each alone: its cross-attention
        K/V computed as in process, so the caption does not depend on who else started)."""
        while True:
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.listener.cancelled():
                self._finish(job, _end, "cancelled")
                continue
            try:
                [job.sequence] = self.decoder.start(job.embeddings, job.params)
            except CapacityError:
                with self._wake:
                    self._waiting.appendleft(job)  # first in line until a caption leaves
                return
            except Exception as exc:
                self._notify(job, lambda j: j.listener.fail(f"caption start failed: {type(exc).__name__}: {exc}", "INTERNAL"))
                self.counts["failed"] += 1
                continue
            with self._wake:
                self._live.append(job)

    def _report(self, job: Job, rows: int):
        sequence = job.sequence
        if sequence.error is not None:  # this caption failed alone (NaN scores); its neighbours go on
            self._finish(job, lambda j: j.listener.fail(str(sequence.error), "INVALID_ARG"), "failed")
            return
        if isinstance(sequence, BeamSequence) and not sequence.done:
            step = Step([], [], False, rows)
        else:
            result = sequence.result()
            step = Step(result.tokens, result.logprobs, sequence.done, rows)
        if not self._notify(job, lambda j: j.listener.step(step)):
            self._finish(job, _end, "cancelled")  # (a step that could not be sent: the FINAL flag is still owed)
        elif sequence.done:
            self._finish(job, None, "finished")

    def _fail_all(self, jobs: list[Job], message: str, code: str):
        for job in jobs:
            self._finish(job, lambda j: j.listener.fail(message, code), "failed")

    def _finish(self, job: Job, last_word: Optional[Callable[[Job], None]], outcome: str):
        if last_word is not None:
            self._notify(job, last_word)
        if job.sequence is not None and job.sequence.rows:
            self.decoder.release(job.sequence)
        with self._wake:
            if job in self._live:
                self._live.remove(job)
        self.counts[outcome] += 1

    def _notify(self, job: Job, tell: Callable[[Job], None]) -> bool:
        """Tell the listener; False if that failed (the caller is gone)."""
        try:
            tell(job)
            return True
        except Exception as exc:
            self.log_error(f"caption listener failed: {type(exc).__name__}: {exc}")
            return False



def _end(job: Job) -> None:
    job.listener.end()
