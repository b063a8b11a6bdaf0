"""The two encoders as ONNX graphs: export, optional int8 weights, and running them with ONNX Runtime.

    write_onnx_encoders(model, folder)                   # text_encoder.onnx, image_encoder.onnx
    text = OnnxEncoder(folder / "text_encoder.onnx")      # CPU, ONNX Runtime's MLAS kernels
    text.run(tokens=..., key_valid=...)[0]               # (B, E) normalised ClassEmbeddings

The text graph takes the trimmed tokens and key validity of `TextEncoder.trim` (the trimming has
a data-dependent length, so it stays in Python); the image graph takes preprocessed pixels and
gives the ClassEmbedding and the ImageEmbeddings. These are the files NVIDIA's onnxruntime (or
TensorRT) backend can serve on a GPU; here the Python backend runs them in process.

precision "int8": every MatMul with a constant 2-D weight becomes ONNX Runtime's MatMulNBits
with 8-bit weights in blocks of 32 along the input dimension (one scale per block, symmetric) and
accuracy_level 4 (activations quantised per block of each row: results do not depend on the
batch). Measured agreement: README and tests/test_onnx_encoders.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .errors import InvalidInputError
from .runtime import Coca

TEXT_FILE, IMAGE_FILE = "text_encoder.onnx", "image_encoder.onnx"
ONNX_PRECISIONS = ("fp32", "int8")
OPSET = 17
BLOCK = 32  # MatMulNBits block along K; ONNX Runtime wants a power of two >= 16


class _TextGraph(torch.nn.Module):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def forward(self, tokens, key_valid):
        return self.text.encode(tokens, key_valid).class_embedding


class _ImageGraph(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixels):
        encoding = self.visual(pixels)
        return encoding.class_embedding, encoding.image_embeddings


def write_onnx_encoders(model: Coca, folder: Union[str, os.PathLike], precision: str = "fp32") -> dict[str, Path]:
    """text_encoder.onnx and image_encoder.onnx of `model` (fp32 weights in, fp32 or int8 in the graph)."""
    if precision not in ONNX_PRECISIONS:
        raise InvalidInputError(f"unknown ONNX precision {precision!r}: use one of {', '.join(ONNX_PRECISIONS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = model.net
    if net.dtype != torch.float32 or net.device.type != "cpu":  # export from an fp32 CPU copy
        import copy

        net = copy.deepcopy(net).float().cpu()
    tokens, key_valid = net.text.trim(model.tokenize(["a photo of a dog"]))
    size = model.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    graphs = {
        TEXT_FILE: (_TextGraph(net.text), (tokens, key_valid), ["tokens", "key_valid"], ["CLASS_EMBEDDING"],
                    {"tokens": {0: "batch", 1: "length"}, "key_valid": {0: "batch", 1: "keys"}}),
        IMAGE_FILE: (_ImageGraph(net.visual), (torch.zeros(1, 3, size, size),), ["pixels"],
                     ["CLASS_EMBEDDING", "IMAGE_EMBEDDINGS"], {"pixels": {0: "batch"}}),
    }
    written = {}
    for name, (graph, args, inputs, outputs, axes) in graphs.items():
        path = folder / name
        tmp = path.with_name(path.name + ".tmp")
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(graph.eval(), args, str(tmp), dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes={**axes, **{o: {0: "batch"} for o in outputs}})
        if precision == "int8":
            int8_weights(tmp, tmp)
        os.replace(tmp, path)
        written[name] = path
    return written


def int8_weights(source: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> int:
    """Rewrite MatMuls with constant (K, N) weights as 8-bit MatMulNBits; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    constants = {init.name: init for init in graph.initializer}
    nodes, converted = [], 0
    for node in graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        array = numpy_helper.to_array(weight) if weight is not None else None
        if array is None or array.ndim != 2 or array.shape[0] % BLOCK:
            nodes.append(node)
            continue
        quantized, scales = _blockwise_int8(array.astype(np.float32))
        names = (f"{node.input[1]}.int8", f"{node.input[1]}.scales")
        graph.initializer.extend([numpy_helper.from_array(quantized, names[0]), numpy_helper.from_array(scales, names[1])])
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *names], list(node.output), name=f"{node.name}.int8", domain="com.microsoft",
            K=array.shape[0], N=array.shape[1], bits=8, block_size=BLOCK, accuracy_level=4))
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == "com.microsoft" for opset in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(graph_model, str(target))
    return converted


def _blockwise_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits layout of W (K, N): uint8 (N, K / BLOCK, BLOCK) around zero point 128, scales (N * K / BLOCK,)."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK)
    scales = np.abs(blocks).max(axis=-1) / 127
    scales[scales == 0] = 1
    quantized = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return quantized.astype(np.uint8), scales.astype(np.float32).reshape(-1)


class OnnxEncoder:
    """One ONNX graph in ONNX Runtime on the CPU. Its threads spin between the graph's operators and stop
    spinning when a run ends: a pool that sleeps between operators paid a wake-up at each one (B/32's text
    graph, one query every 40 ms on a 2-core VM: 25 ms instead of 15.6, 5 ms less CPU per run), and one that
    spins on after a run burns a core the other models share (51 ms of CPU per 15 ms run)."""

    def __init__(self, path: Union[str, os.PathLike], threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: tensor.cpu().numpy() for name, tensor in inputs.items()}
        return [torch.from_numpy(out) for out in self.session.run(None, feed)]

    def encode_texts(self, text_tower, tokens: torch.Tensor) -> torch.Tensor:
        """ClassEmbeddings (B, E) of tokenised texts (B, C), trimmed as the torch tower trims them."""
        trimmed, key_valid = text_tower.trim(tokens)
        return self.run(tokens=trimmed, key_valid=key_valid)[0]

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ClassEmbeddings (B, E), ImageEmbeddings (B, N, W)) of preprocessed pixels (B, 3, S, S)."""
        return tuple(self.run(pixels=pixels.float()))
