"""Triton model coca_captioner: one request per caption, every live caption in each forward, tokens streamed.

A decoupled Python-backend model (see model_repository/coca_captioner/config.pbtxt). A request
carries what the decoder's START carries: IMAGE_EMBEDDINGS (1, 255, W) and the optional sampling
inputs. execute() only checks the request and hands it to the `CaptionScheduler` thread
(serving/models/scheduler.py), which steps all live captions together; each forward answers every
caption it advanced with one response: TOKEN, LOGPROB (the new token; -1 while a beam search has
no result), TEXT (the caption so far, read by the model's tokenizer: clients need none; as
coca_text_decoder's TEXT_SO_FAR, only what later tokens cannot change), TOKENS,
LOGPROBS (so far), DONE and BATCH_ROWS; the last one carries the final flag. A request without
IMAGE_EMBEDDINGS is a probe: one response with STATS (JSON). A cancelled request (the client
closed its stream or disconnected) leaves at the next round and frees its cache rows.
"""
from __future__ import annotations

import json
import traceback

import numpy as np
import torch

from coca.decoding import Decoder
from coca.errors import CapacityError, InvalidInputError

from .common import CocaModel, RequestError
from .scheduler import CaptionScheduler, Step
from .text_decoder import check_embeddings, sampling_params


class CaptionerModel(CocaModel):
    part = "text_decoder"

    def setup(self):
        import transformers.generation  # noqa: F401  beam search's scorer: import now, not in a request
        from coca.quant import quantize

        quantize(self.coca.net, self.parameters.get("precision", "fp32"))
        decoder = Decoder(self.coca.net, capacity=int(self.parameters.get("capacity_rows", "64")))
        cross = decoder.cache.cross[0].k  # (capacity, heads, image tokens, head dim)
        self.embeddings_shape = (1, cross.shape[2], self.coca.net.text_decoder.ln_final.normalized_shape[0])
        waiting = int(self.parameters.get("max_waiting", str(decoder.capacity)))
        self.scheduler = CaptionScheduler(decoder, waiting, self.log_error, name=f"{self.name}-scheduler")
        self.final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self.log_info(f"{self.name}: iterative scheduling, {getattr(self.coca.net, 'precision', 'fp32')}, "
                      f"{decoder.capacity} cache rows ({decoder.cache.nbytes() / 2**20:.0f} MiB), "
                      f"up to {waiting} captions waiting for rows")

    def finalize(self):
        self.scheduler.stop()

    def execute(self, requests: list):
        """Decoupled: every answer goes through the request's response sender; execute returns None."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._accept(request, sender)
            except (RequestError, InvalidInputError, CapacityError) as exc:
                code = exc.code if isinstance(exc, RequestError) else "UNAVAILABLE" if isinstance(exc, CapacityError) else "INVALID_ARG"
                sender.send(self.stream_error(str(exc), code), flags=self.final)
            except Exception as exc:  # a bug must still answer the request, not hang it
                self.log_error(f"{self.name}: {traceback.format_exc()}")
                sender.send(self.stream_error(f"{self.name} failed: {type(exc).__name__}: {exc}", "INTERNAL"), flags=self.final)
        return None

    def stream_error(self, message: str, code: str):
        """An error response whose message starts with its code: a streamed error reaches the client
        as its message alone (serving.client.TritonCoca reads the code back)."""
        return self.error(f"{code}: {message}", code)

    def _accept(self, request, sender):
        embeddings = self.input(request, "IMAGE_EMBEDDINGS")
        if embeddings is None:
            stats = np.array([json.dumps(self.scheduler.stats()).encode()], np.object_)
            sender.send(self.respond({"STATS": stats}), flags=self.final)
            return
        check_embeddings(embeddings, self.embeddings_shape)
        params = sampling_params(self, request)
        listener = ResponseListener(self, request, sender, set(request.requested_output_names()))
        self.scheduler.submit(torch.from_numpy(np.array(embeddings, np.float32)), params, listener)


class ResponseListener:
    """One caption's stream: each Step becomes a response (the outputs the client asked for)."""

    def __init__(self, model: CaptionerModel, request, sender, wanted: set[str]):
        self.model, self.request, self.sender, self.wanted = model, request, sender, wanted

    def cancelled(self) -> bool:
        return self.request.is_cancelled()

    def step(self, step: Step):
        outputs = {
            "TOKEN": lambda: np.array([step.tokens[-1] if step.tokens else -1], np.int64),
            "LOGPROB": lambda: np.array([step.logprobs[-1] if step.logprobs else 0.0], np.float32),
            "TEXT": lambda: np.array([self.text(step).encode()], np.object_),
            "TOKENS": lambda: np.array(step.tokens, np.int64),
            "LOGPROBS": lambda: np.array(step.logprobs, np.float32),
            "DONE": lambda: np.array([step.done], np.bool_),
            "BATCH_ROWS": lambda: np.array([step.batch_rows], np.int32),
        }
        response = self.model.respond({name: make() for name, make in outputs.items() if name in self.wanted})
        self.sender.send(response, flags=self.model.final if step.done else 0)

    def text(self, step: Step) -> str:
        """The caption once done; before, the text so far that later tokens cannot change (the same rule
        as coca_text_decoder's TEXT_SO_FAR: streamed pieces add up to the caption exactly)."""
        return self.model.coca.decode_text(step.tokens) if step.done else self.model.coca.text_so_far(step.tokens)

    def fail(self, message: str, code: str):
        self.sender.send(self.model.stream_error(message, code), flags=self.model.final)

    def end(self):
        self.sender.send(flags=self.model.final)  # no response, only the FINAL flag: the request is released
