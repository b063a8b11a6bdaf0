"""Search and List requests from protobuf: conditions, order, and the one value a search becomes.

A search request, whatever its mode, becomes one `SearchQuery` (mode, vector and/or text, conditions, order,
page position, candidate depth), built once at the edge (service.py) and answered here as one page:
  * by score (every mode): a ranking is the hits in one order, score descending and ties by item id
    (`collection.rank_key`; stores answer their first n hits in it: the keyword index cuts ties by id, vector
    indexes follow a tie group at the cut up to max_search_depth hits). A page
    token holds how many hits earlier pages gave (`depth`) and the last one's (score, id). The next page reads
    the ranking `depth + k + 1` deep and keeps the hits ranked after that cursor: no hit shows twice even if
    the collection changed in between, and while it is unchanged the pages are the ranking's slices. The one
    extra hit says whether a next page exists (no token leads to an empty page). HYBRID fuses its two lists
    read to one depth fixed at the first page (`FUSION_DEPTH`, or k + 1) and carried in the token, so fused
    scores do not move between pages; its pages cover that fused list.
  * by a field: the store walks the field's order from the last hit's position (k + 1 hits, likewise).
List pages resume from the store's position of the last item. Every token carries the fingerprint
of its query, so a token from another query is refused (INVALID_ARGUMENT) rather than misread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .collection import MAX_SEARCH_DEPTH, Collection, Hit, Page, rank_key
from .hybrid import DEFAULT_KEYWORD_WEIGHT, FUSION_DEPTH, check_weight, fuse, keyword_hits
from .pb import search_pb2 as pb
from .query import (BAD_TOKEN, MAX_ANY_OF, MAX_CONDITIONS, PARSERS, VIDEO_ID, Condition, Filter, Order,
                    QueryInputError, Schema, check_condition, check_order, decode_token, encode_token, fingerprint)

MAX_VALUE_CHARS = 4096  # one value in a condition (the longest a metadata value can be)


# ---------------------------------------------------------------- conditions and order
def filter_from_pb(filters: Mapping[str, str], where: Sequence[pb.Condition], schema: Schema) -> Optional[Filter]:
    """The Filter of a request's equality map and `where` conditions (AND); None when there are none."""
    if len(where) > MAX_CONDITIONS:
        raise QueryInputError(f"at most {MAX_CONDITIONS} conditions in `where`, got {len(where)}")
    conditions = [Condition(key, (value,)) for key, value in sorted(filters.items())]
    conditions += [check_condition(_condition(c, i, schema), schema) for i, c in enumerate(where)]
    return Filter(tuple(conditions)) or None


def _condition(condition: pb.Condition, i: int, schema: Schema) -> Condition:
    what = f"condition #{i + 1} ({condition.field[:40]!r})"
    test = condition.WhichOneof("test")
    if test is None:
        raise QueryInputError(f"{what}: give one test: equals, any_of or range")
    if test == "range":
        return _range(condition, what, schema)
    values = (condition.equals,) if test == "equals" else tuple(condition.any_of.values)
    if not 1 <= len(values) <= MAX_ANY_OF:
        raise QueryInputError(f"{what}: any_of takes 1..{MAX_ANY_OF} values, got {len(values)}")
    if any(len(v) > MAX_VALUE_CHARS for v in values):
        raise QueryInputError(f"{what}: values are at most {MAX_VALUE_CHARS} characters")
    return Condition(condition.field, values, negate=condition.negate)


def _range(condition: pb.Condition, what: str, schema: Schema) -> Condition:
    bounds = {name: getattr(condition.range, name) for name in ("gte", "gt", "lte", "lt")
              if condition.range.HasField(name)}
    if not bounds:
        raise QueryInputError(f"{what}: a range needs at least one bound (gte, gt, lte, lt)")
    if {"gte", "gt"} <= bounds.keys() or {"lte", "lt"} <= bounds.keys():
        raise QueryInputError(f"{what}: give at most one lower bound (gte or gt) and one upper bound (lte or lt)")
    check_condition(Condition(condition.field), schema)  # a typed field?
    parse = PARSERS[schema.type_of(condition.field)]
    try:
        values = {name: parse(text) for name, text in bounds.items()}
    except ValueError as exc:
        raise QueryInputError(f"{what}: {exc}") from None
    low, high = values.get("gte", values.get("gt")), values.get("lte", values.get("lt"))
    return Condition(condition.field, low=low, high=high, low_open="gt" in values, high_open="lt" in values,
                     negate=condition.negate)


def order_from_pb(order: pb.Order, schema: Schema) -> Optional[Order]:
    if not order.field:
        if order.descending:
            raise QueryInputError("order_by.descending needs order_by.field")
        return None
    return check_order(Order(order.field, order.descending), schema)


# ---------------------------------------------------------------- one search
VECTOR, KEYWORD, HYBRID = "vector", "keyword", "hybrid"


@dataclass(frozen=True)
class Position:
    """Where a page starts in its query's ranking: after `after` (the last hit shown: [score, id], or in a
    field order its position), `depth` hits in; a hybrid query's lists are read `fusion_depth` deep."""

    depth: int = 0
    after: Optional[list] = None
    fusion_depth: int = 0

    @classmethod
    def of(cls, token: str, query: str) -> "Position":
        if not token:
            return cls()
        position = decode_token(token, query)
        depth, after, fusion = position.get("d"), position.get("a"), position.get("f", 0)
        if not (_count(depth) and _count(fusion) and isinstance(after, list)):
            raise QueryInputError(BAD_TOKEN)
        return cls(depth, after, fusion)

    def token(self, query: str) -> str:
        fields = {"d": self.depth, "a": self.after, **({"f": self.fusion_depth} if self.fusion_depth else {})}
        return encode_token(query, fields)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class SearchQuery:
    """One search request, whatever its mode: what it asks, and which page. Built once at the edge, answered by
    `page(collection)`: the paging rules live here alone.

    A ranking is the query's hits in one order (`collection.rank_key`: score descending, ties by id; or a
    field's order). A page is the next `k` hits of it after the last hit shown, so while the collection is
    unchanged the pages concatenate to the ranking, and while it changes no hit shows twice and none that
    stayed live and ranks above the last shown hit is skipped."""

    mode: str  # VECTOR, KEYWORD or HYBRID
    k: int
    identity: str  # fingerprint of everything but the page: a page token names it
    vector: Optional[np.ndarray] = None  # VECTOR, HYBRID
    text: str = ""  # KEYWORD, HYBRID
    filters: Optional[Filter] = None
    min_score: Optional[float] = None  # VECTOR
    order: Optional[Order] = None  # VECTOR: by a field instead of by score
    keyword_weight: float = DEFAULT_KEYWORD_WEIGHT  # HYBRID
    consistency: Optional[str] = None  # remote stores: Strong, Session, Bounded, Eventually
    with_captions: bool = False  # caption the hits that have none (the edge does)
    start: Position = Position()
    max_depth: int = MAX_SEARCH_DEPTH  # pages reach this many hits of a ranking by score
    group_by_video: bool = False  # the ranking keeps each video's best scene only (a still image: itself)

    @classmethod
    def build(cls, mode: str, k: int, query: list, page_token: str = "", *, filters: Optional[Filter] = None,
              min_score: Optional[float] = None, order: Optional[Order] = None,
              keyword_weight: float = DEFAULT_KEYWORD_WEIGHT, max_depth: int = MAX_SEARCH_DEPTH,
              fusion_depth: int = FUSION_DEPTH, group_by_video: bool = False, **given) -> "SearchQuery":
        """A query from checked parts; `query` names what is searched for (["text", text, ...], ["id", id]).
        QueryInputError for a combination no mode takes or a page token of another query."""
        if mode != VECTOR and (order is not None or min_score is not None):
            raise QueryInputError("order_by and min_score work in VECTOR mode only")
        if group_by_video and order is not None:
            raise QueryInputError("group_by_video ranks by score: give no order_by")
        identity = fingerprint("search", query, [min_score, filters.key() if filters else [],
                                                 order.key() if order else None] + (["videos"] if group_by_video else []))
        start = Position.of(page_token, identity)
        if page_token and order is None and start.depth + k > max_depth:
            raise QueryInputError(f"pages reach the first {max_depth} hits of a search: narrow it (conditions, "
                                  f"min_score) or browse with List")
        if start.fusion_depth > max_depth:
            raise QueryInputError(BAD_TOKEN)
        if mode == HYBRID and not start.fusion_depth:
            start = Position(start.depth, start.after, min(max_depth, max(fusion_depth, k + 1)))
        return cls(mode, k, identity, filters=filters, min_score=min_score, order=order,
                   keyword_weight=check_weight(keyword_weight), start=start, max_depth=max_depth,
                   group_by_video=group_by_video, **given)

    def page(self, collection: Collection) -> tuple[list[Hit], str]:
        """This page's hits and the next page's token ("" after the last page)."""
        if self.order is not None:
            return self._page_by_field(collection)
        after = None if self.start.after is None else _cursor(self.start.after)
        searched = self.start.depth + self.k + 1  # through this page, and one more hit: is there a next page?
        while True:
            ranked, whole = self._ranking(collection, searched)
            rest = ranked if after is None else [h for h in ranked if rank_key(h) > after]
            # Fewer than k + 1 hits after the cursor from a full search: hits above it were added since the
            # last page (or it ranked lower then); search deeper rather than end the pages early.
            if len(rest) > self.k or whole or len(ranked) < searched or searched >= self.max_depth + self.k + 1:
                break
            searched = min(2 * searched, self.max_depth + self.k + 1)
        hits = rest[:self.k]
        if len(rest) <= self.k or not hits:
            return collection.filled(hits, self.consistency), ""
        last = hits[-1]
        next_start = Position(self.start.depth + len(hits), [last.score, last.item.id], self.start.fusion_depth)
        return collection.filled(hits, self.consistency), next_start.token(self.identity)

    def _ranking(self, collection: Collection, n: int) -> tuple[list[Hit], bool]:
        """The first `n` hits of the ranking by score (items possibly ids only: `Collection.ranking`), and whether
        that is all of it regardless of `n`. Grouped by video: the first `n` groups' best hits, read from a
        ranking as deep as it takes to hold `n` groups (doubling, up to max_depth hits)."""
        if not self.group_by_video:
            return self._ungrouped(collection, n)
        depth = n
        while True:
            ranked, whole = self._ungrouped(collection, depth)
            best = best_per_video(ranked)
            if len(best) >= n or whole or len(ranked) < depth or depth >= self.max_depth:
                return best, whole or len(ranked) < depth
            depth = min(2 * depth, self.max_depth)

    def _ungrouped(self, collection: Collection, n: int) -> tuple[list[Hit], bool]:
        if self.mode == VECTOR:
            return collection.ranking(self.vector, n, self.filters, self.min_score, self.consistency), False
        if self.mode == KEYWORD:
            return keyword_hits(collection.keyword_search(self.text, n, self.filters)), False
        depth = self.start.fusion_depth  # fixed for all pages: fused scores do not move between them
        near = collection.ranking(self.vector, depth, self.filters, None, self.consistency)
        return fuse(near, keyword_hits(collection.keyword_search(self.text, depth, self.filters)),
                    self.keyword_weight), True

    def _page_by_field(self, collection: Collection) -> tuple[list[Hit], str]:
        """In a field's order the store walks from the last hit's position (k + 1 hits: is there more?)."""
        hits = collection.search(self.vector, self.k + 1, self.filters, self.min_score, self.consistency,
                                 self.order, self.start.after)
        page = hits[:self.k]
        if len(hits) <= self.k:
            return page, ""
        return page, Position(self.start.depth + len(page), page[-1].position).token(self.identity)


def best_per_video(ranked: list[Hit]) -> list[Hit]:
    """The first hit of each video in a ranking (a hit that is no video scene stands for itself), in its order."""
    seen: set[str] = set()
    best = []
    for hit in ranked:
        group = hit.item.metadata.get(VIDEO_ID) or "\0" + hit.item.id  # "\0": no video id starts with it
        if group not in seen:
            seen.add(group)
            best.append(hit)
    return best


def _cursor(after: list) -> tuple[float, str]:
    if len(after) != 2 or not isinstance(after[0], (int, float)) or isinstance(after[0], bool) \
            or not isinstance(after[1], str):
        raise QueryInputError(BAD_TOKEN)
    return -float(after[0]), after[1]


def list_position(token: str, query: str) -> Optional[list]:
    """The store position a List page token resumes after (None: the first page)."""
    if not token:
        return None
    after = decode_token(token, query).get("a")
    if not isinstance(after, list):
        raise QueryInputError(BAD_TOKEN)
    return after


def list_token(page: Page, query: str) -> str:
    return encode_token(query, {"a": page.next_after}) if page.next_after is not None else ""
