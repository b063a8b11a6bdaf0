"""The model card's "Net information" for any torch module: the element count
of every array, their total, and how many layers of each type.

"Arrays" are the learned parameters (named_parameters()); buffers such as
attention masks are derived constants, not learned, and are left out. A tensor
shared by several modules (tied weights) is counted once, under its first name.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from torch import nn

# Modules counted as one layer even though they have children: the children of
# MultiheadAttention (its out_proj Linear) are an implementation detail.
ATOMIC_LAYERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

# Leaf modules that are not layers: open_clip puts nn.Identity wherever an
# optional feature (layer scale, a final norm) is switched off.
NOT_LAYERS: tuple[type[nn.Module], ...] = (nn.Identity,)

ROOT_PART = "(root)"


def array_element_counts(module: nn.Module) -> dict[str, int]:
    """Element count of each parameter, by its dotted name, in definition order."""
    return {name: param.numel() for name, param in module.named_parameters()}


def total_element_count(module: nn.Module) -> int:
    """Number of learned scalars in `module` (tied tensors counted once)."""
    return sum(array_element_counts(module).values())


def part_element_counts(module: nn.Module) -> dict[str, int]:
    """Element count per top-level part (direct child), e.g. visual / text /
    text_decoder for CoCa; parameters held by `module` itself are grouped
    under "(root)" (CoCa's logit_scale). Sums to total_element_count()."""
    counts: dict[str, int] = {}
    for name, elements in array_element_counts(module).items():
        part = name.split(".", 1)[0] if "." in name else ROOT_PART
        counts[part] = counts.get(part, 0) + elements
    return counts


def layer_type_counts(module: nn.Module) -> Counter[str]:
    """How many layers of each class (by class name) `module` contains.

    A layer is a module that computes one step of the forward pass: every leaf
    module (no children: Linear, LayerNorm, GELU, Dropout, Embedding, Conv2d
    ...) except placeholders in NOT_LAYERS, and every module in ATOMIC_LAYERS
    (MultiheadAttention) as a whole, without its children. Containers and
    blocks (Sequential, ResidualAttentionBlock, Transformer) are structure,
    not layers; parameters they hold directly (positional embeddings, the
    attentional pooler's queries) appear in array_element_counts() only.
    """
    counts: Counter[str] = Counter()

    def visit(node: nn.Module) -> None:
        children = list(node.children())
        if isinstance(node, ATOMIC_LAYERS) or (not children and not isinstance(node, NOT_LAYERS)):
            counts[type(node).__name__] += 1
            return
        for child in children:
            visit(child)

    visit(module)
    return counts


def format_table(rows: Mapping[str, int] | Iterable[tuple[str, int]], headers: Sequence[str] = ("name", "count"),
                 *, total: bool = False) -> str:
    """A plain-text two-column table, counts right-aligned with thousands
    separators, and a closing "total" row when `total` is set."""
    pairs = list(rows.items() if isinstance(rows, Mapping) else rows)
    if total:
        pairs.append(("total", sum(count for _, count in pairs)))
    cells = [(str(name), f"{count:,}") for name, count in pairs]
    name_width = max([len(headers[0])] + [len(name) for name, _ in cells])
    count_width = max([len(headers[1])] + [len(count) for _, count in cells])
    rule = f"{'-' * name_width}  {'-' * count_width}"
    lines = [f"{headers[0]:<{name_width}}  {headers[1]:>{count_width}}", rule]
    lines += [f"{name:<{name_width}}  {count:>{count_width}}" for name, count in cells]
    if total:
        lines.insert(-1, rule)
    return "\n".join(lines)


def net_information(module: nn.Module, *, arrays: bool = False) -> str:
    """The whole report: parts with total, layer types, and (if `arrays`)
    every array's element count."""
    sections = [
        format_table(part_element_counts(module), ("part", "elements"), total=True),
        format_table(sorted(layer_type_counts(module).items(), key=lambda kv: (-kv[1], kv[0])),
                     ("layer type", "count"), total=True),
    ]
    if arrays:
        sections.append(format_table(array_element_counts(module), ("array", "elements"), total=True))
    return "\n\n".join(sections)
