"""Reduced-precision compute paths: opt-in, each with its measured agreement to fp32 (README, tests).

    net = coca.load("coca_ViT-B-32", "random").net
    quantize(net, "int8")            # the decoder's step in int8: text tower, decoder, vocabulary
    quantize(net, "bf16")            # the same linears with bf16 weights (where the CPU has AVX512-BF16/AMX)

"int8" is dynamic quantisation (fbgemm): weights int8 per output channel, made once here;
activations quantised per call and per row (7-bit: fbgemm's overflow-safe choice on CPUs
without VNNI), so a row's result does not depend on the rest of its batch. Every linear a decode step reads is replaced: the packed self-attention
projections, the cross-attention query projections (the image keys/values are computed once per
image and stay fp32), the MLPs, the output projections and the 512 x 49408 vocabulary projection.
A step then reads a quarter of the bytes, and fbgemm's small-M kernels beat fp32 MKL on this CPU.

"bf16" replaces the same linears with bf16 weights and bf16 inputs, accumulated in fp32 by oneDNN
(AVX512-BF16 / AMX where the CPU has them; elsewhere torch converts in software): half the bytes per
step. Measured on an AVX2-only CPU (README): a B/32 step 1.5x faster than fp32's even so, since a
batch-1 step is bound by the bytes it streams; small cache-resident matrices run slower than fp32 there.
Everything else of the step stays fp32 -- layer norms, softmax, the KV cache, the image keys/values,
the logits and sampling -- unlike a whole-net `dtype="bfloat16"`.
fp32 stays the default everywhere: a precision is asked for by name.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import InvalidInputError
from .model import Attention, CoCa, CrossBlock

PRECISIONS = ("fp32", "int8", "bf16")
DECODER_PARTS = ("text", "text_decoder")  # what a decode step runs


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output row) and each row of x quantised on its own.

    fbgemm quantises its whole input with one range, so a row's result would depend on the other
    rows of the batch (a Triton batch would change a caption). Each row is therefore divided by its
    own max |x| and an anchor row holding +1 and -1 is appended: the range is then always [-1, 1],
    every row is quantised alike whatever the batch, and its scale is multiplied back afterwards.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float().cpu()
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().float().cpu()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; 2.13 (pinned) has them
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        anchor = torch.zeros(1, weight.shape[1])
        anchor[0, :2] = torch.tensor([1.0, -1.0])
        self.anchor = anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        row_scale = torch.linalg.vector_norm(flat, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)
        unit = torch.cat([flat / row_scale, self.anchor])
        y = torch.ops.quantized.linear_dynamic(unit, self._packed, True)[:-1]  # reduce_range: no int16 overflow
        y = y.mul_(row_scale) if self.bias is None else torch.addcmul(self.bias, y, row_scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Bf16Linear(nn.Module):
    """y = x W^T + b with W and x rounded to bf16, products summed in fp32, b added in fp32.

    One row's result is a function of that row alone for a given kernel; whether the machine's
    kernels keep it so across batch sizes is what the batch-invariance gate (coca/precision.py) and
    tests/test_precision.py measure. Where the CPU has bf16 dot products (AVX512-BF16/AMX), W is
    reordered once into oneDNN's blocked layout: the same kernels' results, bit for bit, without
    reordering W on every call (a B/32 bf16 step 34.0 -> 26.9 ms on a Xeon with AMX; README).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float()
        self.weight = _bf16_weight(weight.detach().to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, None, "none", [], "").float()
        else:
            y = torch.nn.functional.linear(rows, self.weight).float()
        y = y if self.bias is None else y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def __getstate__(self):  # a oneDNN tensor has no storage to copy or pickle: its dense values are kept
        state = super().__getstate__().copy()
        state["weight"] = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.weight = _bf16_weight(self.weight)


def _bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """W (bf16, dense) in oneDNN's layout where the CPU computes bf16 natively, else as it is."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    return weight


LINEARS = {"int8": Int8Linear, "bf16": Bf16Linear}  # precision -> the linear a decode step runs


def _quantize_attention(attn: Attention, names: tuple[str, ...], linear: type):
    wq, wk, wv = attn._weights()
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    weights = {"q": (wq, bq), "k": (wk, bk), "v": (wv, bv)}
    if attn.packed:
        weights["qkv"] = (attn.in_proj_weight, attn.in_proj_bias)
    attn.kernels = {name: linear(*weights[name]) for name in names}
    attn.out_proj = linear(attn.out_proj.weight, attn.out_proj.bias)


def quantize(net: CoCa, precision: str, parts: tuple[str, ...] = DECODER_PARTS) -> CoCa:
    """Switch `parts` (top-level modules: "text", "text_decoder") of `net` to `precision`, in place."""
    if check_precision(precision) == "fp32":
        return net
    if net.device.type != "cpu":
        raise InvalidInputError(f"precision {precision} runs on the CPU only (fbgemm, oneDNN); this net is on {net.device}")
    linear = LINEARS[precision]
    for part in parts:
        module = getattr(net, part)
        for sub in list(module.modules()):
            if isinstance(sub, CrossBlock):  # the step projects only its queries; image K/V: once, fp32
                _quantize_attention(sub.attn, ("q",), linear)
            elif isinstance(sub, Attention) and not sub.kernels:
                _quantize_attention(sub, ("qkv",) if sub.packed else ("q", "k", "v"), linear)
            elif hasattr(sub, "c_fc") and hasattr(sub, "c_proj"):  # MLP
                sub.c_fc, sub.c_proj = (linear(m.weight, m.bias) for m in (sub.c_fc, sub.c_proj))
        if part == "text_decoder":
            module.vocab_kernel = linear(module.text_projection.t())
    net.precision = precision
    return net
