"""Search and List requests from protobuf: conditions, order and pages (the store-agnostic part).

Pages of a search are slices of one ranking:
  * by score: hits are ranked by (score desc, id); a page token holds how many hits earlier pages
    gave (`depth`) and the last one's (score, id). The next page searches `depth + k + 1` deep and
    keeps the hits ranked after that cursor, so no hit shows twice even if the collection changed in
    between; while it is unchanged, pages are the ranking's slices. The one extra hit says whether a
    next page exists (no token leads to an empty page).
  * by a field: the store walks the field's order from the last hit's position (k + 1 hits, likewise).
List pages resume from the store's position of the last item. Every token carries the fingerprint
of its query, so a token from another query is refused (INVALID_ARGUMENT) rather than misread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .collection import Hit, Page
from .pb import search_pb2 as pb
from .query import (MAX_ANY_OF, MAX_CONDITIONS, PARSERS, Condition, Filter, Order, QueryInputError, Schema,
                    check_condition, check_order, decode_token, encode_token, fingerprint)

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


# ---------------------------------------------------------------- pages
@dataclass
class SearchPage:
    """Where a search page starts in its ranking: the first page, or a page token's position."""

    query: str  # fingerprint of the query the pages belong to
    depth: int = 0  # hits the earlier pages gave
    after: Optional[list] = None  # (score, id) of the last hit; or in a field order, its position

    @classmethod
    def start(cls, token: str, query: str, k: int, max_depth: int) -> "SearchPage":
        if not token:
            return cls(query)
        position = decode_token(token, query)
        depth, after = position.get("d"), position.get("a")
        if not isinstance(depth, int) or depth < 0 or not (after is None or isinstance(after, list)):
            raise QueryInputError("page_token is not one this service made (pass next_page_token back unchanged)")
        if depth + k > max_depth:
            raise QueryInputError(f"pages reach the first {max_depth} hits of a search: narrow it (conditions, "
                                  f"min_score) or browse with List")
        return cls(query, depth, after)

    def depth_by_score(self, k: int) -> int:
        """How deep to search for this page by score: through it, and one more hit (is there a next page?)."""
        return self.depth + k + 1

    def by_score(self, hits: list[Hit], k: int) -> tuple[list[Hit], str]:
        """This page of a ranking searched `depth_by_score(k)` deep, and the next page's token ("" when none)."""
        ranked = sorted(hits, key=_rank_key)
        if self.after is not None:
            cursor = _cursor(self.after)
            ranked = [h for h in ranked if _rank_key(h) > cursor]
        page = ranked[:k]
        more = len(ranked) > k
        token = encode_token(self.query, {"d": self.depth + len(page), "a": [page[-1].score, page[-1].item.id]}) \
            if more else ""
        return page, token

    def by_field(self, hits: list[Hit], k: int) -> tuple[list[Hit], str]:
        """A page of a search in a field's order, from `k + 1` hits the store gave after `after`, and the
        next page's token."""
        page = hits[:k]
        more = len(hits) > k
        return page, encode_token(self.query, {"d": self.depth + len(page), "a": page[-1].position}) if more else ""


def _rank_key(hit: Hit) -> tuple[float, str]:
    return -hit.score, hit.item.id


def _cursor(after: list) -> tuple[float, str]:
    if len(after) != 2 or not isinstance(after[0], (int, float)) or not isinstance(after[1], str):
        raise QueryInputError("page_token is not one this service made (pass next_page_token back unchanged)")
    return -float(after[0]), after[1]


def search_fingerprint(*parts) -> str:
    return fingerprint("search", *parts)


def list_position(token: str, query: str) -> Optional[list]:
    """The store position a List page token resumes after (None: the first page)."""
    if not token:
        return None
    after = decode_token(token, query).get("a")
    if not isinstance(after, list):
        raise QueryInputError("page_token is not one this service made (pass next_page_token back unchanged)")
    return after


def list_token(page: Page, query: str) -> str:
    return encode_token(query, {"a": page.next_after}) if page.next_after is not None else ""
