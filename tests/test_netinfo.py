"""coca.netinfo on a toy module (exact by hand) and on open_clip's CoCa B/32."""

import open_clip
import pytest
import torch
from torch import nn

from coca.netinfo import (
    array_element_counts,
    format_table,
    layer_type_counts,
    net_information,
    part_element_counts,
    total_element_count,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # held by the root, like CoCa's logit_scale
        self.embed = nn.Embedding(10, 4)  # 40
        self.block = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Identity(), nn.LayerNorm(3))  # 15 + 6
        self.attn = nn.MultiheadAttention(4, 2)  # in_proj 48 + 12, out_proj 16 + 4
        self.head = nn.Linear(3, 10, bias=False)  # 30
        self.register_buffer("mask", torch.zeros(5, 5))


@pytest.fixture(scope="module")
def coca_b32():
    return open_clip.create_model("coca_ViT-B-32", pretrained=None)


def test_toy_array_counts_and_total():
    counts = array_element_counts(Toy())
    assert counts["scale"] == 1
    assert counts["embed.weight"] == 40
    assert counts["block.0.weight"] == 12 and counts["block.0.bias"] == 3
    assert counts["attn.in_proj_weight"] == 48 and counts["attn.out_proj.weight"] == 16
    assert "mask" not in counts  # buffers are not arrays
    assert total_element_count(Toy()) == 1 + 40 + 15 + 6 + 80 + 30


def test_tied_weights_counted_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert total_element_count(model) == 40
    assert list(array_element_counts(model)) == ["0.weight"]


def test_toy_parts_sum_to_total():
    parts = part_element_counts(Toy())
    assert parts == {"(root)": 1, "embed": 40, "block": 21, "attn": 80, "head": 30}


def test_toy_layer_types():
    assert layer_type_counts(Toy()) == {
        "Embedding": 1,
        "Linear": 2,
        "GELU": 1,
        "LayerNorm": 1,
        "MultiheadAttention": 1,  # its out_proj is not counted separately; Identity is no layer
    }


def test_format_table_aligns_and_totals():
    table = format_table({"visual": 89_164_032, "text": 63_428_608}, ("part", "elements"), total=True)
    assert table.splitlines() == [
        "part       elements",
        "------  -----------",
        "visual   89,164,032",
        "text     63,428,608",
        "------  -----------",
        "total   152,592,640",
    ]


def test_format_table_accepts_pairs():
    assert format_table([("Linear", 2)], ("layer type", "count")).splitlines()[-1] == "Linear          2"


def test_coca_b32_totals(coca_b32):
    assert total_element_count(coca_b32) == 253_560_065
    assert total_element_count(coca_b32) == sum(p.numel() for p in coca_b32.parameters())
    parts = part_element_counts(coca_b32)
    assert parts == {"text": 63_428_608, "visual": 89_164_032, "text_decoder": 100_967_424, "(root)": 1}
    assert round(parts["visual"] / 1e6, 1) == 89.2
    assert round(parts["text"] / 1e6, 1) == 63.4
    assert round(parts["text_decoder"] / 1e6, 1) == 101.0
    assert sum(parts.values()) == 253_560_065


def test_coca_b32_arrays(coca_b32):
    counts = array_element_counts(coca_b32)
    assert len(counts) == 629
    assert counts["logit_scale"] == 1
    assert counts["text.token_embedding.weight"] == 49408 * 512
    assert counts["visual.conv1.weight"] == 768 * 3 * 32 * 32


def test_coca_b32_layer_types(coca_b32):
    # 12 vision + 12 text + 12 decoder self-attention + 12 decoder cross-attention + pooler
    assert layer_type_counts(coca_b32) == {
        "MultiheadAttention": 49,
        "Linear": 96,
        "LayerNorm": 114,
        "GELU": 48,
        "Embedding": 1,
        "Conv2d": 1,
    }


def test_net_information_report(coca_b32):
    report = net_information(coca_b32)
    assert "253,560,065" in report
    assert "MultiheadAttention" in report
    assert "visual.conv1.weight" not in report
    assert "visual.conv1.weight" in net_information(coca_b32, arrays=True)
