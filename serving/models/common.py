"""What the three CoCa Triton models share: loading their part, threads, answering each request.

Triton calls `initialize(args)`, then `execute(requests)` (one list of requests per
batch; every request must get exactly one response), then `finalize()`.
`triton_python_backend_utils` is imported in `initialize`: its C++-injected classes
(TritonError, InferenceResponse, Tensor) do not exist while model.py is imported.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from coca.errors import InvalidInputError
from coca.loading import file_sha256, load_part
from coca.runtime import Coca
from serving.protocol import ONNX_FILE, WEIGHTS_FILE, Identity


class RequestError(Exception):
    """Fails one request of a batch with a message and a TritonError code name."""

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


class CocaModel:
    """Base of the Triton models: subclasses set `part` and implement `run(requests)`."""

    part: str

    def initialize(self, args: dict):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(self.parameters.get("torch_threads", "2")))
        self.identity = self._identity()
        started = time.perf_counter()
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        weights = self.version_dir / WEIGHTS_FILE
        self._check_weights(weights)
        net = load_part(self.identity.model, self.part, weights, device=self._device())
        preprocess = json.loads(self.parameters["coca_preprocess"])
        self.coca = Coca(net, self.identity.model, self.identity.pretrained, preprocess)
        self.setup()
        self.log_info(
            f"{self.name}: {self.identity.model} ({self.identity.pretrained}, {self.identity.dtype}) "
            f"{self.part} loaded on {net.device} in {time.perf_counter() - started:.1f} s; "
            f"{torch.get_num_threads()} torch threads"
        )

    def setup(self):
        """Subclass hook, after the weights are loaded."""

    def execute(self, requests: list) -> list:
        try:
            return self.run(requests)
        except Exception as exc:  # a bug must still answer every request, not hang them
            self.log_error(f"{self.name}: {traceback.format_exc()}")
            return [self.error(f"{self.name} failed: {type(exc).__name__}: {exc}", "INTERNAL") for _ in requests]

    def run(self, requests: list) -> list:
        raise NotImplementedError

    def finalize(self):
        pass

    # --- requests and responses ------------------------------------------------------
    def input(self, request, name: str) -> Optional[np.ndarray]:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def prepare_each(self, requests: list, prepare: Callable) -> list:
        """prepare(request) for each; a request's bad input becomes its RequestError, the others go on."""
        prepared = []
        for request in requests:
            try:
                prepared.append(prepare(request))
            except InvalidInputError as exc:
                prepared.append(RequestError(str(exc)))
            except RequestError as exc:
                prepared.append(exc)
        return prepared

    def error(self, message: str, code: str = "INVALID_ARG"):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, getattr(self.pb.TritonError, code)))

    def respond(self, outcome):
        """An error response for a RequestError, else a response of the named arrays."""
        if isinstance(outcome, RequestError):
            return self.error(str(outcome), outcome.code)
        return self.pb.InferenceResponse([self.pb.Tensor(name, array) for name, array in outcome.items()])

    # --- logging (the server log) -------------------------------------------------------
    def log_info(self, message: str):
        self.pb.Logger.log_info(message)

    def log_error(self, message: str):
        self.pb.Logger.log_error(message)

    def _device(self) -> str:
        """The `device` parameter: auto (the GPU when torch sees one, else the CPU), cpu, cuda, cuda:N."""
        wanted = self.parameters.get("device", "auto")
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return wanted

    # --- identity ------------------------------------------------------------------------
    def _identity(self) -> Identity:
        try:
            return Identity.from_parameters(self.parameters)
        except (KeyError, ValueError) as exc:
            raise RuntimeError(
                f"{self.name}: config.pbtxt has no CoCa identity ({exc}): this model repository was "
                "not exported; run `coca export --model NAME --pretrained TAG --out DIR` first"
            ) from exc

    def _check_weights(self, weights: Path):
        if not weights.is_file():
            raise RuntimeError(f"{self.name}: no weights at {weights}; run `coca export` into this repository")
        if file_sha256(weights) != self.parameters.get("coca_weights_sha256"):
            raise RuntimeError(
                f"{self.name}: {weights} is not the file config.pbtxt was exported with (sha256 differs); "
                "export the repository again"
            )


class EncoderModel(CocaModel):
    """A dynamically batched encoder: each request's input is prepared (and rejected) alone,
    the good ones are encoded together, and each request gets the outputs it asked for.

    Parameter `runtime`: "torch" (default) or "onnxruntime": the exported 1/model.onnx
    (`coca export --format onnx`) computes the embeddings; attention outputs stay with torch.
    """

    onnx = None

    def setup(self):
        if self.parameters.get("runtime", "torch") != "onnxruntime":
            return
        from coca.onnx_encoders import OnnxEncoder

        path = self.version_dir / ONNX_FILE
        if not path.is_file() or file_sha256(path) != self.parameters.get("coca_onnx_sha256"):
            raise RuntimeError(f"{self.name}: {path} is missing or not the file config.pbtxt was exported with; "
                               "run `coca export --format onnx` into this repository again")
        self.onnx = OnnxEncoder(path, threads=torch.get_num_threads())
        self.log_info(f"{self.name}: embeddings by ONNX Runtime from {path} ({self.parameters.get('precision', 'fp32')})")

    def prepare(self, request) -> torch.Tensor:
        """The request's rows as one model input (B, ...); InvalidInputError fails that request."""
        raise NotImplementedError

    def forward(self, batch: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        """Batched outputs (B, ...) by output name, at least those in `wanted`."""
        raise NotImplementedError

    def forward_groups(self, good: list[int], wanted: list[set[str]]) -> list[list[int]]:
        """Which prepared requests to encode together (default: all in one forward)."""
        return [good] if good else []

    def run(self, requests: list) -> list:
        wanted = [set(request.requested_output_names()) for request in requests]
        outcomes = self.prepare_each(requests, self.prepare)
        good = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, RequestError)]
        for group in self.forward_groups(good, wanted):
            with torch.inference_mode():
                batch = torch.cat([outcomes[i] for i in group]).to(self.coca.net.device)
                outputs = self.forward(batch, set().union(*(wanted[i] for i in group)))
            parts = {name: tensor.split([len(outcomes[i]) for i in group]) for name, tensor in outputs.items()}
            for j, i in enumerate(group):
                outcomes[i] = {name: _numpy(parts[name][j]) for name in wanted[i]}
        return [self.respond(outcome) for outcome in outcomes]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.cpu()
    return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
