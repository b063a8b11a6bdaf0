"""The encoder requests serving.client serializes itself (bytes_request): the same message tritonclient would
send, each item's bytes copied once. Tests through a real Triton (tests/test_triton.py, test_triton_pool.py)
check the embeddings these requests give against the in-process model."""
from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from serving.client import bytes_request


def tritonclients_request(model: str, name: str, items: list[bytes], outputs: list[str]) -> service_pb2.ModelInferRequest:
    tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_).reshape(-1, 1))
    return _get_inference_request(model_name=model, inputs=[tensor], model_version="", request_id="",
                                  outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], sequence_id=0,
                                  sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None)


def test_a_serialized_encoder_request_is_the_message_tritonclient_builds():
    cases = [("coca_image_encoder", "IMAGE", [b"\x89PNG" + bytes(range(256)) * 3, b"", b"x" * 200_000], ["CLASS_EMBEDDING"]),
             ("coca_text_encoder", "TEXT", ["a cat".encode(), "ünïcode".encode()], ["ATTENTION", "TOKENS"]),
             ("coca_image_encoder", "IMAGE", [b"\xff" * 127], ["CLASS_EMBEDDING", "IMAGE_EMBEDDINGS", "ATTENTION"])]
    for model, name, items, outputs in cases:
        ours = service_pb2.ModelInferRequest.FromString(bytes_request(model, name, items, outputs))
        assert ours == tritonclients_request(model, name, items, outputs), (model, len(items))
