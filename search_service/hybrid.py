"""KEYWORD and HYBRID search modes: the keyword list alone, or fused with the vector list.

Reciprocal rank fusion (Cormack et al. 2009): an item's fused score is (1 - w) / (60 + its vector rank)
+ w / (60 + its keyword rank), a term only for the lists that found it. Ranks are what the two lists
agree on; their scores (cosine, BM25) are on unrelated scales, so they are not mixed. Each hit keeps
its ranks and keyword relevance so clients can see which list found it.
"""
from __future__ import annotations

import dataclasses

from .collection import Hit, rank_key
from .query import QueryInputError

RRF_K = 60
DEFAULT_KEYWORD_WEIGHT = 0.5
FUSION_DEPTH = 100  # each list is read this deep (or k + 1, if more) for the whole of a query's pages


def check_weight(weight: float) -> float:
    if not 0 <= weight <= 1:
        raise QueryInputError(f"keyword_weight must be in [0, 1], got {weight}")
    return weight


def keyword_hits(hits: list[Hit]) -> list[Hit]:
    """A keyword list (in ranking order) as hits that carry their keyword rank and relevance (the score)."""
    ranked = sorted(hits, key=rank_key)
    return [dataclasses.replace(h, keyword_rank=rank, keyword_score=h.score) for rank, h in enumerate(ranked, 1)]


def fuse(vector: list[Hit], keyword: list[Hit], weight: float) -> list[Hit]:
    """Both lists (each in ranking order, read to one fixed depth) as one, in ranking order by fused score.
    The depth must not move between a query's pages: an item found by both lists only deeper would gain
    fused score on a later page and rank before hits already shown."""
    fused: dict[str, Hit] = {}
    for rank, hit in enumerate(vector, 1):
        fused[hit.item.id] = dataclasses.replace(hit, score=(1 - weight) / (RRF_K + rank), vector_rank=rank)
    for rank, hit in enumerate(keyword, 1):
        known = fused.get(hit.item.id)
        base = known if known is not None else dataclasses.replace(hit, score=0.0)
        fused[hit.item.id] = dataclasses.replace(base, score=base.score + weight / (RRF_K + rank), keyword_rank=rank,
                                                 keyword_score=hit.score)
    return sorted(fused.values(), key=rank_key)
