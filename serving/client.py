"""Async client of the CoCa models on a Triton server (gRPC, `tritonclient.grpc.aio`).

    async with TritonCoca("127.0.0.1:8001") as triton:
        await triton.check_identity("coca_ViT-B-32")        # refuse a server holding another model
        vectors = await triton.embed_images([open("a.jpg", "rb").read()])
        caption = await triton.caption(b"...jpeg bytes...", SamplingParams())  # coca.Caption
        async for step in triton.caption_steps(b"...", SamplingParams()):  # the text as it grows
            print(step.text, step.done)

Captions: where the server has coca_captioner (a repository exported with `--decoder-scheduler
iterative`), each caption is ONE request on a gRPC bidirectional stream and the server streams its
tokens (`captioner_steps`), stepping every live caption in each forward; otherwise each caption is one
sequence of coca_text_decoder, driven step by step (unique correlation id, END always sent, also on
error or cancellation). `scheduler` ("auto", "iterative", "sequence") chooses. Captions of many
images run concurrently, so the server advances them together in batched forwards. Errors: coca.InvalidInputError
(the server refused the input), coca.CapacityError (decoder cache full),
serving.errors.TritonUnavailableError (cannot reach the server), TritonRequestError.
`caption_files` is the synchronous wrapper the CLI uses.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import logging
import os
import re
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, Optional, Sequence, Union

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from coca import media
from coca.captions import Caption
from coca.errors import CapacityError, InvalidInputError
from coca.settings import SamplingParams

from .errors import IdentityMismatchError, SequenceLostError, TritonRequestError, TritonUnavailableError
from .protocol import (CAPACITY_MESSAGE, CAPTIONER, DECODER_SCHEDULERS, IMAGE_ENCODER, SAMPLING_INPUTS, STEP_OUTPUTS,
                       STREAM_OUTPUTS, TEXT_DECODER, TEXT_ENCODER, TRITON_MODELS, Identity)

ImageInput = Union[bytes, str, os.PathLike]
log = logging.getLogger("serving.client")
InferObserver = Callable[[str, float, bool], None]  # (model, seconds, succeeded)

# tritonclient's message limits, plus: a subchannel of this channel's own, so that a new client is not
# tied to the reconnect backoff another channel to the same address is sitting in (gRPC shares
# subchannels process-wide by default); and reconnect tries at most 1 s apart instead of up to 120 s,
# so a restarted Triton is used within a second.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# Per-request deadlines toward an endpoint that has another to fail over to (serving.pool): a request not
# answered within DEADLINE_P99_MULTIPLE x the recent p99 per row of the same model on the same endpoint x the
# request's rows (images or texts of an encoder batch; a decoder or captioner step counts 1), at least
# DEADLINE_FLOOR_S and at most the cap (DEADLINE_CAP_S, or DEADLINE_CAP_PER_ROW_S x rows for a larger batch),
# takes the endpoint as hung: TritonUnavailableError, the pool takes it out of rotation and runs the call again
# elsewhere. Per row, so a 32-image batch under load gets 32x a one-image request's time, not the same 5 s (a
# healthy endpoint taken out would flap). The p99 is over the last DEADLINE_WINDOW answered requests; with fewer
# than DEADLINE_MIN_SAMPLES the cap applies. The floor keeps a busy but healthy server (a 2-core box's
# scheduling pauses) from being taken for a hung one.
DEADLINE_P99_MULTIPLE = 4.0
DEADLINE_FLOOR_S = 1.0
DEADLINE_CAP_S = 5.0
DEADLINE_CAP_PER_ROW_S = 0.5  # the cap of a batch of more than DEADLINE_CAP_S / this rows
DEADLINE_WINDOW = 256
DEADLINE_MIN_SAMPLES = 16


def deadline_cap(rows: int) -> float:
    """The longest latency deadline of a request of `rows` rows."""
    return max(DEADLINE_CAP_S, DEADLINE_CAP_PER_ROW_S * rows)


class LatencyWindow:
    """Recent answered-request latencies per row of one endpoint, per model, and the deadline they give."""

    def __init__(self, window: int = DEADLINE_WINDOW):
        self._seconds: dict[str, deque] = {}
        self.window = window

    def record(self, model: str, seconds: float, rows: int = 1) -> None:
        """An answered request of `rows` rows that took `seconds`."""
        self._seconds.setdefault(model, deque(maxlen=self.window)).append(seconds / max(1, rows))

    def p99(self, model: str) -> Optional[float]:
        """The recent p99 of seconds per row (None: too little history)."""
        seconds = self._seconds.get(model)
        if seconds is None or len(seconds) < DEADLINE_MIN_SAMPLES:
            return None
        return float(np.percentile(np.fromiter(seconds, float), 99))

    def deadline(self, model: str, rows: int = 1) -> float:
        """How long a request of `rows` rows may take before its endpoint is taken as hung."""
        p99, cap = self.p99(model), deadline_cap(rows)
        if p99 is None:
            return cap
        return min(max(DEADLINE_P99_MULTIPLE * p99 * rows, DEADLINE_FLOOR_S), cap)


# Set (by serving.pool) while a call runs on an endpoint that has another healthy one to fail over to:
# only then does a request get a latency deadline. The last endpoint left waits as long as the caller.
latency_deadlines: contextvars.ContextVar[bool] = contextvars.ContextVar("latency_deadlines", default=False)


@dataclass
class Generation:
    """One caption as the decoder produced it, with the batch size of each step's forward."""

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    text: str = ""  # the decoder's own reading of the tokens, answered to END (or the text so far)
    done: bool = False  # the caption is finished (generate_steps' last Generation)


def reproducible(params: SamplingParams) -> bool:
    """Whether a caption with `params` gives the same tokens each time it is made (greedy, or seeded)."""
    return params.temperature == 0 or params.seed is not None


class HandedSteps:
    """The steps of one caption handed out so far, so that a caption started again (a dropped decoder
    sequence, an endpoint that failed under it) hands out only the steps after them: a reproducible
    caption's new run gives the same steps, so its first `count` are skipped, and the last of those is
    checked to equal what was handed out (SequenceLostError if not). Call new_run() before each run."""

    def __init__(self):
        self.count = 0  # steps handed out
        self.last_tokens: list[int] = []  # the tokens of the last one
        self._step = 0  # steps of the current run seen

    def can_restart(self, params: SamplingParams) -> bool:
        """Whether the caption may start again: nothing handed out yet, or a run gives the same steps."""
        return self.count == 0 or reproducible(params)

    def new_run(self) -> None:
        self._step = 0

    def is_new(self, generation: Generation) -> bool:
        """Whether the run's next step, `generation`, is past what was handed out: hand it out."""
        self._step += 1
        if self._step == self.count and generation.tokens != self.last_tokens:
            raise SequenceLostError("the caption started again gave other tokens than those already handed out")
        if self._step <= self.count:
            return False
        self.count, self.last_tokens = self._step, list(generation.tokens)
        return True


@dataclass
class CaptionStep:
    """One streamed response of coca_captioner: the token a forward added, and the caption so far."""

    token: int  # -1 while a beam search has no result yet
    logprob: float
    text: str  # the caption so far, read by the server's tokenizer
    tokens: list[int]  # so far (a beam search: its result, on the last step)
    logprobs: list[float]
    done: bool  # the last step
    batch_rows: int  # rows of the forward that produced it


class TritonCoca:
    """CoCa through Triton: embeddings and captions; one instance per event loop."""

    def __init__(self, url: str, timeout_s: Optional[float] = None, observe: Optional[InferObserver] = None,
                 scheduler: str = "auto", latency: Optional[LatencyWindow] = None):
        if scheduler not in ("auto", *DECODER_SCHEDULERS):
            raise ValueError(f"scheduler must be auto, {' or '.join(DECODER_SCHEDULERS)}, got {scheduler!r}")
        self.url = url
        self.scheduler = scheduler  # auto: coca_captioner where the server has it, else the step protocol
        self._captioner_served: Optional[bool] = None
        self.timeout_s = timeout_s  # per request; None: wait as long as the server takes
        self.observe = observe  # told (model, seconds, ok) after every infer call: the service's metrics
        self.latency = latency or LatencyWindow()  # answered requests; per-request deadlines (latency_deadlines)
        self._client: Optional[grpcaio.InferenceServerClient] = None

    async def __aenter__(self) -> "TritonCoca":
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # created inside the running loop, which it binds to
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    # --- identity ----------------------------------------------------------------------
    async def identity(self) -> Identity:
        """The model and weights the server's repository holds (the same in all three models).

        Asked anew on every call (three small config requests): the server may have been
        restarted with other weights since, and an answer also says that it is up and loaded.
        """
        configs = await asyncio.gather(*(self._call(self.client.get_model_config(name, as_json=True), name)
                                         for name in TRITON_MODELS))
        found = {name: _identity(name, c["config"]) for name, c in zip(TRITON_MODELS, configs)}
        if len(set(found.values())) > 1:
            raise IdentityMismatchError(
                f"the models on {self.url} come from different exports: "
                + "; ".join(f"{name}: {i.model} ({i.pretrained}, id {i.repository_id})" for name, i in found.items()))
        return next(iter(found.values()))

    async def check_identity(self, expected_model: Optional[str] = None,
                             expected_pretrained: Optional[str] = None) -> Identity:
        """The server's identity; IdentityMismatchError unless it holds the expected model/weights."""
        identity = await self.identity()
        for what, expected, actual in (("model", expected_model, identity.model),
                                       ("weights", expected_pretrained, identity.pretrained)):
            if expected is not None and expected != actual:
                raise IdentityMismatchError(
                    f"Triton at {self.url} serves {identity.model} ({identity.pretrained}, {identity.dtype}), "
                    f"not the expected {what} {expected!r}: export that model into its repository and restart it")
        return identity

    # --- encoders ----------------------------------------------------------------------
    async def encode_images(self, images: Sequence[ImageInput], outputs: Sequence[str] = ("CLASS_EMBEDDING",),
                            batch_size: int = 16) -> dict[str, np.ndarray]:
        """The image encoder's outputs by name (CLASS_EMBEDDING, IMAGE_EMBEDDINGS, ATTENTION), N rows each.

        Requests of `batch_size` images are sent at once; the server computes only what is asked.
        """
        data = [_image_bytes(image) for image in images]
        chunks = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        parts = await asyncio.gather(*(self._encode(IMAGE_ENCODER, "IMAGE", chunk, outputs) for chunk in chunks))
        return {name: _concat([part[name] for part in parts]) for name in outputs}

    async def embed_images(self, images: Sequence[ImageInput], batch_size: int = 16) -> np.ndarray:
        """Normalised image ClassEmbeddings (N, E), float32."""
        return (await self.encode_images(images, ["CLASS_EMBEDDING"], batch_size))["CLASS_EMBEDDING"]

    async def image_embeddings(self, images: Sequence[ImageInput], batch_size: int = 16) -> np.ndarray:
        """What the decoder reads: (N, 255, W) float32."""
        return (await self.encode_images(images, ["IMAGE_EMBEDDINGS"], batch_size))["IMAGE_EMBEDDINGS"]

    async def image_attention(self, images: Sequence[ImageInput], batch_size: int = 16) -> np.ndarray:
        """The last ViT block's attention (N, H, 1 + P, 1 + P)."""
        return (await self.encode_images(images, ["ATTENTION"], batch_size))["ATTENTION"]

    async def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised text ClassEmbeddings (N, E), float32."""
        chunks = [[t.encode() for t in texts[i : i + batch_size]] for i in range(0, len(texts), batch_size)]
        parts = await asyncio.gather(*(self._encode(TEXT_ENCODER, "TEXT", chunk, ["CLASS_EMBEDDING"]) for chunk in chunks))
        return _concat([part["CLASS_EMBEDDING"] for part in parts])

    async def text_attention(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Last-layer attention (N, H, n + 1, n + 1) and the n token ids it refers to (N, n)."""
        found = await self._encode(TEXT_ENCODER, "TEXT", [t.encode() for t in texts], ["ATTENTION", "TOKENS"])
        return found["ATTENTION"], found["TOKENS"]

    async def _encode(self, model: str, input_name: str, items: list[bytes], outputs: Sequence[str]) -> dict:
        request = bytes_request(model, input_name, items, outputs)
        result = await self._timed(model, len(items), lambda deadline: self._send_serialized(request, deadline))
        return {name: result.as_numpy(name) for name in outputs}

    async def _send_serialized(self, request: bytes, deadline: Optional[float]) -> grpcclient.InferResult:
        """ModelInfer with a request serialized here (bytes_request); errors as tritonclient raises them."""
        infer = self.client._channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None,
                                                 response_deserializer=service_pb2.ModelInferResponse.FromString)
        try:
            return grpcclient.InferResult(await infer(request, timeout=deadline))
        except grpc.RpcError as exc:
            raise InferenceServerException(msg=exc.details(), status=str(exc.code())) from None

    # --- captions ----------------------------------------------------------------------
    async def caption(self, image: Union[ImageInput, np.ndarray], params: SamplingParams = SamplingParams()) -> Caption:
        """The caption of an image (bytes or path) or of its ImageEmbeddings (255, W)."""
        embeddings = image if isinstance(image, np.ndarray) else (await self.image_embeddings([image]))[0]
        generation = await self.generate(embeddings, params)
        return Caption(generation.text, generation.tokens, generation.logprobs)

    async def caption_steps(self, image: Union[ImageInput, np.ndarray],
                            params: SamplingParams = SamplingParams()) -> AsyncIterator[Generation]:
        """The caption of an image (bytes, path or ImageEmbeddings) as it grows: a Generation with the
        text so far after each decoder step, the last one `done` (see generate_steps). Close the
        iterator to stop early: the sequence is then ended on the server."""
        embeddings = image if isinstance(image, np.ndarray) else (await self.image_embeddings([image]))[0]
        async with contextlib.aclosing(self.generate_steps(embeddings, params, text_so_far=True)) as steps:
            async for generation in steps:
                yield generation

    async def caption_many(self, images: Sequence[ImageInput], params: SamplingParams = SamplingParams(),
                           concurrency: int = 16) -> list[Caption]:
        """Captions of many images, `concurrency` sequences at a time, in input order."""
        limit = asyncio.Semaphore(concurrency)

        async def one(image):
            async with limit:
                return await self.caption(image, params)

        return list(await asyncio.gather(*(one(image) for image in images)))

    async def caption_video(self, video: ImageInput, frames: int = 16, params: SamplingParams = SamplingParams(),
                            decode_seconds: float = media.DEFAULT_MAX_DECODE_SECONDS) -> Caption:
        """The caption of a video: frames decoded here, their ImageEmbeddings averaged (video_embeddings)."""
        return await self.caption(await self.video_embeddings(video, frames, decode_seconds), params)

    async def video_embeddings(self, video: ImageInput, frames: int = 16,
                               decode_seconds: float = media.DEFAULT_MAX_DECODE_SECONDS) -> np.ndarray:
        """What the decoder reads for a video: the mean of its frames' ImageEmbeddings (255, W), as in process.

        Decoding runs in a thread that cannot be cancelled: it stops itself after `decode_seconds`."""
        pictures = await asyncio.to_thread(media.video_frames, video, frames, max_seconds=decode_seconds)
        embeddings = await self.image_embeddings([_png(p) for p in pictures])  # PNG: lossless, same pixels
        return embeddings.mean(0)  # float32, rows summed in order: as torch's mean

    async def generate(self, image_embeddings: np.ndarray, params: SamplingParams = SamplingParams()) -> Generation:
        """One caption of ImageEmbeddings (255, W), finished (see generate_steps)."""
        async with contextlib.aclosing(self.generate_steps(image_embeddings, params)) as steps:
            async for generation in steps:
                pass
        return generation

    async def generate_steps(self, image_embeddings: np.ndarray, params: SamplingParams = SamplingParams(),
                             text_so_far: bool = False) -> AsyncIterator[Generation]:
        """The caption after each step; the last one has `done` set and the finished text, and with
        `text_so_far` each one holds the text so far (a prefix of the finished text). Streamed by
        coca_captioner where the server has it (see `scheduler`), else one decoder sequence stepped from
        here. Close the iterator to stop early: the server then frees the caption's cache rows."""
        steps = self._streamed_steps if await self.uses_captioner() else self._restarted_sequence_steps
        async with contextlib.aclosing(steps(image_embeddings, params, text_so_far)) as generations:
            async for generation in generations:
                yield generation

    async def _streamed_steps(self, image_embeddings: np.ndarray, params: SamplingParams,
                              text_so_far: bool) -> AsyncIterator[Generation]:
        generation = Generation([])
        async with contextlib.aclosing(self.captioner_steps(image_embeddings, params)) as steps:
            async for step in steps:
                generation.batch_rows.append(step.batch_rows)
                generation.tokens, generation.logprobs, generation.done = step.tokens, step.logprobs, step.done
                if text_so_far or step.done:
                    generation.text = step.text
                yield generation

    async def uses_captioner(self) -> bool:
        """Whether captions go to coca_captioner: scheduler "iterative", or "auto" and the server has it
        (asked once per client; a client made after a failure asks again)."""
        if self.scheduler != "auto":
            return self.scheduler == "iterative"
        if self._captioner_served is None:
            deadline = self._deadline("is_model_ready")
            try:
                self._captioner_served = bool(await self.client.is_model_ready(CAPTIONER, client_timeout=deadline))
            except InferenceServerException as exc:
                if self._timed_out(exc, deadline):
                    raise self._hung(f"{CAPTIONER} readiness", deadline) from None
                if (exc.status() or "").endswith("UNAVAILABLE"):  # the server, not the model, is missing
                    raise self._translate(exc, CAPTIONER) from None
                self._captioner_served = False  # an older server that errs on an unknown model
        return self._captioner_served

    async def captioner_steps(self, image_embeddings: np.ndarray,
                            params: SamplingParams = SamplingParams()) -> AsyncIterator[CaptionStep]:
        """One caption from coca_captioner as it is generated: a CaptionStep per forward, the last one done.

        One request on a gRPC bidirectional stream. Leaving early (break, cancellation, an error) cancels
        the request and the server frees its cache rows at its next forward; close the iterator
        (`contextlib.aclosing`) to make that happen at once.
        """
        inputs = _start_inputs(image_embeddings, params)
        last = lambda result: bool(result.as_numpy("DONE")[0])  # noqa: E731
        async with contextlib.aclosing(self._stream(CAPTIONER, inputs, STREAM_OUTPUTS, last)) as results:
            async for result in results:
                yield _caption_step(result)

    async def captioner_stats(self) -> dict:
        """coca_captioner's scheduler: live and waiting captions, free rows, forwards and rows so far."""
        import json

        async with contextlib.aclosing(self._stream(CAPTIONER, [], ["STATS"], lambda result: True)) as results:
            async for result in results:
                return json.loads(result.as_numpy("STATS")[0])

    async def _stream(self, model: str, inputs: list, outputs: Sequence[str],
                      is_last: Callable[[object], bool]) -> AsyncIterator[object]:
        """The responses (InferResult) to ONE request over a gRPC bidirectional stream (what a decoupled
        model needs), up to the one `is_last` says ends it. Leaving early cancels the request."""
        finished = asyncio.Event()

        async def request():  # the stream stays open (not half-closed) until the last response
            yield {"model_name": model, "inputs": inputs,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs]}
            await finished.wait()

        started, ok = time.perf_counter(), False
        responses = None
        try:
            responses = self.client.stream_infer(request(), stream_timeout=self.timeout_s)
            async for result, error in self._each_in_time(responses, model):
                if error is not None:
                    raise self._translate_streamed(error.message() or str(error), model)
                ok = is_last(result)
                yield result
                if ok:
                    return
            raise TritonRequestError(f"{model}: the stream ended before the last response")
        except InferenceServerException as exc:
            raise self._translate(exc, model) from None
        except grpc.aio.AioRpcError as exc:
            raise self._translate_rpc(exc, model) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this caller was cancelled
            # grpc's way of saying that the channel was closed under the stream (TritonCoca.close())
            raise TritonUnavailableError(f"the connection to Triton at {self.url} was closed during the call") from None
        finally:
            finished.set()
            if responses is not None:
                responses.cancel()  # after the last response: a no-op for the server; before it: frees the request
            if self.observe is not None:
                self.observe(model, time.perf_counter() - started, ok)

    async def _each_in_time(self, responses, model: str) -> AsyncIterator:
        """The stream's responses, each within the model's latency deadline while one applies
        (latency_deadlines): a stream that stops answering is a hung server, as for one request."""
        responses = aiter(responses)
        while True:
            deadline, asked = self._deadline(model), time.perf_counter()
            try:
                response = await asyncio.wait_for(anext(responses), deadline)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise self._hung(model, deadline) from None
            self.latency.record(model, time.perf_counter() - asked)
            yield response

    async def _restarted_sequence_steps(self, image_embeddings: np.ndarray, params: SamplingParams,
                                        text_so_far: bool) -> AsyncIterator[Generation]:
        """_sequence_steps, started again once when the decoder forgot the sequence (Triton drops one idle
        past max_sequence_idle_microseconds, e.g. a client starved of CPU between two steps). A greedy or
        seeded caption is reproducible: the new sequence's steps up to where the lost one got are not
        handed out again (they are the same; checked). Another caption cannot be resumed: SequenceLostError."""
        handed = HandedSteps()
        for attempt in range(2):
            handed.new_run()
            try:
                async with contextlib.aclosing(self._sequence_steps(image_embeddings, params, text_so_far)) as steps:
                    async for generation in steps:
                        if handed.is_new(generation):
                            yield generation
                    return
            except SequenceLostError as exc:
                if attempt or not handed.can_restart(params):
                    raise SequenceLostError(f"{exc} (the caption could not be finished; ask again)") from None
                log.warning("%s: starting the caption again", exc)

    async def _sequence_steps(self, image_embeddings: np.ndarray, params: SamplingParams,
                              text_so_far: bool) -> AsyncIterator[Generation]:
        """One decoder sequence: START with the embeddings, step until DONE, then END, which answers the
        caption's text (so no tokenizer is needed here); the text so far is the decoder's TEXT_SO_FAR.
        END is sent whatever happens: an error, a cancellation, a caller that stops early."""
        sequence_id = secrets.randbits(63) or 1  # unique among clients without coordination
        outputs = STEP_OUTPUTS + (("TEXT_SO_FAR",) if text_so_far else ())
        generation = Generation([])
        ended = False
        try:
            inputs = _start_inputs(image_embeddings, params)
            while True:
                result = await self._infer(TEXT_DECODER, inputs, outputs, sequence_id=sequence_id,
                                           sequence_start=bool(inputs))
                inputs = []
                generation.batch_rows.append(int(result.as_numpy("BATCH_ROWS")[0, 0]))
                generation.tokens = result.as_numpy("TOKENS")[0].tolist()
                generation.logprobs = result.as_numpy("LOGPROBS")[0].tolist()
                if text_so_far:
                    generation.text = result.as_numpy("TEXT_SO_FAR")[0, 0].decode()
                if bool(result.as_numpy("DONE")[0, 0]):
                    ended = True
                    answer = await asyncio.shield(self._infer(TEXT_DECODER, [], ["TEXT"], sequence_id=sequence_id,
                                                              sequence_end=True))
                    generation.text, generation.done = answer.as_numpy("TEXT")[0, 0].decode(), True
                    yield generation
                    return
                yield generation
        except TritonUnavailableError:
            # nothing to END on a server that cannot be reached or does not answer (it would wait as long
            # again); if it comes back, it drops the sequence at its idle limit
            ended = True
            raise
        finally:  # END frees the server's cache and Triton's sequence slot, whatever happened
            if not ended:
                await asyncio.shield(self._end(sequence_id))

    async def _end(self, sequence_id: int):
        try:
            await self._infer(TEXT_DECODER, [], ["DONE"], sequence_id=sequence_id, sequence_end=True)
        except Exception:  # already gone (failed START, expired): nothing left to free
            pass

    async def decoder_stats(self) -> dict:
        """The decoder's cache: live sequences, free rows, cache bytes, expiry counts.

        Asked with START+END and no embeddings, which the decoder answers without starting
        anything (so it works with a full cache too).
        """
        import json

        result = await self._infer(TEXT_DECODER, [], ["STATS"], sequence_id=secrets.randbits(63) or 1,
                                   sequence_start=True, sequence_end=True)
        return json.loads(result.as_numpy("STATS")[0, 0])

    # --- transport -----------------------------------------------------------------------
    async def _infer(self, model: str, inputs: list, outputs: Sequence[str], rows: int = 1, **sequence):
        """One request of `rows` rows (an encoder batch's items; 1: a decoder step, a stats call)."""
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        return await self._timed(model, rows, lambda deadline: self.client.infer(
            model, inputs, outputs=requested, client_timeout=deadline, **sequence))

    async def _timed(self, model: str, rows: int, send: Callable[[Optional[float]], Awaitable]):
        """`send(deadline)`, one request of `rows` rows to `model`, within its deadline (_deadline): its latency
        recorded, the observer told, errors translated (_call)."""
        deadline = self._deadline(model, rows)
        started, ok = time.perf_counter(), False
        try:
            result = await self._call(send(deadline), model, deadline, rows)
            ok = True
            self.latency.record(model, time.perf_counter() - started, rows)
            return result
        finally:
            if self.observe is not None:
                self.observe(model, time.perf_counter() - started, ok)

    async def _call(self, request, model: str, deadline: Optional[float] = None, rows: int = 1):
        try:
            return await request
        except InferenceServerException as exc:
            if self._timed_out(exc, deadline):
                raise self._hung(model, deadline, rows) from None
            raise self._translate(exc, model) from None

    def _deadline(self, model: str, rows: int = 1) -> Optional[float]:
        """A request's client-side limit: timeout_s, and the model's latency deadline for `rows` rows while one
        applies."""
        if not latency_deadlines.get():
            return self.timeout_s
        seconds = self.latency.deadline(model, rows)
        return seconds if self.timeout_s is None else min(seconds, self.timeout_s)

    @staticmethod
    def _timed_out(exc: InferenceServerException, deadline: Optional[float]) -> bool:
        """The request ran past a latency deadline (not only the caller's own timeout_s)."""
        return deadline is not None and latency_deadlines.get() and (exc.status() or "").endswith("DEADLINE_EXCEEDED")

    def _hung(self, model: str, deadline: float, rows: int = 1) -> TritonUnavailableError:
        p99 = self.latency.p99(model)
        basis = (f"{DEADLINE_P99_MULTIPLE:g}x its recent p99 of {p99:.3f} s per row x {rows} rows" if p99 is not None
                 else "no latency history yet")
        return TritonUnavailableError(f"Triton at {self.url} did not answer {model} within {deadline:.2f} s "
                                      f"({basis}; bounds {DEADLINE_FLOOR_S}-{deadline_cap(rows)} s): taken as hung")

    def _translate_streamed(self, message: str, model: str = CAPTIONER) -> Exception:
        """A streamed error carries no status: coca_captioner starts its own messages with the code
        name (serving.models.captioner); Triton's own (a wrong shape or type) are the request's fault."""
        code, _, rest = message.partition(": ")
        if code in STREAM_ERROR_CODES:
            return self._translate(InferenceServerException(rest, status=STREAM_ERROR_CODES[code]), model)
        return self._translate(InferenceServerException(message, status="StatusCode.INVALID_ARGUMENT"), model)

    def _translate_rpc(self, exc: grpc.aio.AioRpcError, model: str) -> Exception:
        return self._translate(InferenceServerException(exc.details() or "", status=str(exc.code())), model)

    def _translate(self, exc: InferenceServerException, model: str) -> Exception:
        """A typed error with the server's words (request-id noise removed)."""
        status, message = exc.status() or "", re.sub(r"^\[request id: [^\]]*\]\s*", "", exc.message() or str(exc))
        if model == TEXT_DECODER and _SEQUENCE_LOST.search(message):
            return SequenceLostError(f"{model} at {self.url} does not know the caption's sequence (dropped idle, "
                                     f"or never started): {message}")
        if status.endswith("INVALID_ARGUMENT"):
            return InvalidInputError(f"{model}: {message}")
        if status.endswith("UNAVAILABLE") and CAPACITY_MESSAGE in message:
            return CapacityError(f"{model}: {message}")
        if status.endswith("UNAVAILABLE"):
            return TritonUnavailableError(f"cannot reach Triton at {self.url}: {message}")
        if "unknown model" in message.lower() or "not ready" in message.lower():
            return TritonUnavailableError(f"Triton at {self.url} does not serve {model}: {message}")
        return TritonRequestError(f"{model}: {status or 'error'}: {message}")


# Triton's sequence batcher on a step for a sequence it dropped (idle), and the decoder's own words for one
# whose cache it freed (serving/models/text_decoder.py).
_SEQUENCE_LOST = re.compile(r"must specify the START flag|unknown sequence \d+")


# --- helpers ---------------------------------------------------------------------------------
def caption_files(url: str, files: Sequence[str], params: SamplingParams, frames: int = 16,
                  concurrency: int = 16) -> Iterator[tuple[str, str]]:
    """(path, caption) for image and video files, captioned concurrently through Triton at `url`."""

    async def run():
        async with TritonCoca(url) as triton:
            await triton.check_identity()
            limit = asyncio.Semaphore(concurrency)

            async def one(path):
                async with limit:
                    if media.is_video(path):
                        return (await triton.caption_video(path, frames, params)).text
                    return (await triton.caption(path, params)).text

            return await asyncio.gather(*(one(path) for path in files))

    yield from zip(files, asyncio.run(run()))


# coca_captioner's error codes (message prefixes) -> the gRPC status a unary call would have had
STREAM_ERROR_CODES = {"INVALID_ARG": "StatusCode.INVALID_ARGUMENT", "UNAVAILABLE": "StatusCode.UNAVAILABLE",
                      "INTERNAL": "StatusCode.INTERNAL"}


def _caption_step(result) -> CaptionStep:
    def first(name):
        return result.as_numpy(name).reshape(-1)[0]

    tokens, logprobs = result.as_numpy("TOKENS").reshape(-1).tolist(), result.as_numpy("LOGPROBS").reshape(-1).tolist()
    return CaptionStep(tokens[-1] if tokens else -1, logprobs[-1] if logprobs else 0.0, first("TEXT").decode(),
                       tokens, logprobs, bool(first("DONE")), int(first("BATCH_ROWS")))


def _identity(name: str, config: dict) -> Identity:
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    try:
        return Identity.from_parameters(parameters)
    except (KeyError, ValueError) as exc:
        raise IdentityMismatchError(f"{name} has no CoCa identity in its config ({exc}): not a `coca export` repository")


MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_RAW_CONTENTS_TAG = bytes([service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2])


def bytes_request(model: str, input_name: str, items: Sequence[bytes], outputs: Sequence[str]) -> bytes:
    """A serialized ModelInferRequest of one BYTES input [len(items), 1] (Triton's length-prefixed items) asking
    for `outputs`: the message without its raw content as protobuf writes it, then the raw_input_contents field
    written here (protobuf reads fields in any order). Each item's bytes are copied once, into the request;
    tritonclient copies them four times (its serialized tensor, the request message, its serialization,
    gRPC's), which for AddImages' 32 MiB images held several times the intake budget."""
    header = service_pb2.ModelInferRequest(model_name=model, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name=input_name, datatype="BYTES", shape=[len(items), 1])], outputs=[
        service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs])
    parts = [header.SerializeToString(), _RAW_CONTENTS_TAG, _varint(sum(4 + len(item) for item in items))]
    for item in items:
        parts += [struct.pack("<I", len(item)), item]
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _array_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _start_inputs(image_embeddings: np.ndarray, params: SamplingParams) -> list:
    embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32).reshape(1, *image_embeddings.shape[-2:])
    inputs = [_array_input("IMAGE_EMBEDDINGS", embeddings)]
    for field_name, (name, dtype) in SAMPLING_INPUTS.items():
        value = getattr(params, field_name)
        if value is not None:
            inputs.append(_array_input(name, np.array([[value]], dtype=dtype)))
    return inputs


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
