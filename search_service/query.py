"""What a search or List asks for besides the query vector: conditions on fields, an order, a page.

* `Schema`: the collection's declared metadata fields (`--field year:number --field taken:date --field title:text`).
  Undeclared fields are strings. Number and date fields can be ranged over and ordered by; text fields are
  strings that KEYWORD search also looks in (beside captions).
  `added_at` (when the item was stored) is a built-in date field; `start_s`, `end_s` and `video_duration_s`
  (video scenes) are built-in number fields.
* `Condition`: one test on one field (equals, any of, a range), optionally negated; a `Filter` is
  conditions that must all hold. An item without the field fails every test (so passes its negation).
* `Order`: by a date/number field, ascending or descending; items without the field come last.
* Page tokens: opaque to clients (base64url of a small JSON), bound to the request they continue by
  a fingerprint, so a token of another query is refused instead of silently paging something else.

Typed values: numbers are finite floats; dates are ISO 8601 (`2024-05-01`, `2024-05-01T12:00:00Z`,
with an offset; no zone means UTC) held as Unix seconds.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

ADDED_AT = "added_at"
# Video scenes carry these in their metadata (search_service/video.py): which video, where in it, how long it
# is. Built in: the numbers are typed fields of every collection, and no other item may set them.
VIDEO_ID = "video_id"
VIDEO_NUMBERS = {"start_s": "number", "end_s": "number", "video_duration_s": "number"}
VIDEO_FIELDS = (VIDEO_ID, *VIDEO_NUMBERS)
FIELD_TYPES = ("string", "number", "date", "text")
TYPED = ("number", "date")
MAX_CONDITIONS = 64
MAX_ANY_OF = 256
MAX_TOKEN_CHARS = 2048
MAX_FIELD_CHARS = 256


class QueryInputError(ValueError):
    """A condition, order or page token the collection cannot take; the message says which and why."""


# ---------------------------------------------------------------- typed values
def parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]!r} is not a finite number")
    return value


def parse_date(text: str) -> float:
    """ISO 8601 date or date-time -> Unix seconds (no zone: UTC)."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 date (e.g. 2024-05-01 or 2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


PARSERS = {"number": parse_number, "date": parse_date}


# ---------------------------------------------------------------- schema
@dataclass(frozen=True)
class Schema:
    """Declared metadata fields: name -> string | number | date | text (a string keyword search covers)."""

    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name, kind in self.fields.items():
            if kind not in FIELD_TYPES:
                raise ValueError(f"field {name!r}: type must be one of {FIELD_TYPES}, got {kind!r}")
            if name == ADDED_AT:
                raise ValueError(f"{ADDED_AT!r} is built in (the time an item was stored): choose another name")
            if name in VIDEO_FIELDS:
                raise ValueError(f"{name!r} is built in (video scenes): choose another name")
            if not name or len(name) > MAX_FIELD_CHARS:
                raise ValueError(f"field names are 1..{MAX_FIELD_CHARS} characters")

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "Schema":
        """From `NAME:TYPE` strings (the --field option)."""
        fields = {}
        for spec in specs:
            name, sep, kind = spec.rpartition(":")
            if not sep or not name:
                raise ValueError(f"--field {spec!r}: write it as NAME:TYPE (TYPE one of {', '.join(FIELD_TYPES)})")
            fields[name] = kind
        return cls(fields)

    def type_of(self, name: str) -> str:
        return "date" if name == ADDED_AT else VIDEO_NUMBERS.get(name) or self.fields.get(name, "string")

    @property
    def typed_fields(self) -> dict[str, str]:
        """Declared number and date fields and the video ones (ranges and orders work on these and on added_at)."""
        return {**VIDEO_NUMBERS, **{name: kind for name, kind in self.fields.items() if kind in TYPED}}

    @property
    def text_fields(self) -> list[str]:
        """Declared text fields: the metadata keyword search reads besides captions."""
        return sorted(name for name, kind in self.fields.items() if kind == "text")

    def typed_value(self, name: str, text: str) -> Optional[float]:
        """A declared number/date field's value as a float; None when it does not parse (or is untyped)."""
        parser = PARSERS.get(self.type_of(name))
        if parser is None:
            return None
        try:
            return parser(text)
        except ValueError:
            return None

    def check_metadata(self, metadata: Mapping[str, str]) -> None:
        """ValueError naming the first value of a typed field that does not parse as its type."""
        for name, kind in self.typed_fields.items():
            if name in metadata:
                try:
                    PARSERS[kind](metadata[name])
                except ValueError as exc:
                    raise ValueError(f"metadata {name!r} is declared {kind} in the collection schema: {exc}") from None

    def as_pairs(self) -> list[tuple[str, str]]:
        return sorted(self.fields.items())


# ---------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    """One test on one field: `values` (equals / any of) or a range [low, high] (typed fields)."""

    field: str
    values: tuple[str, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low < value instead of low <= value
    high_open: bool = False
    negate: bool = False

    @property
    def is_range(self) -> bool:
        return not self.values

    def holds(self, metadata: Mapping[str, str], added_at: float, schema: Schema) -> bool:
        """The test on one item, negation applied: the plain definition (stores implement it their own way)."""
        if self.is_range:
            value = added_at if self.field == ADDED_AT else (
                schema.typed_value(self.field, metadata[self.field]) if self.field in metadata else None)
            passed = value is not None and self.in_range(value)
        else:
            passed = metadata.get(self.field) in self.values
        return passed != self.negate

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def key(self) -> list:
        return [self.field, list(self.values), self.low, self.high, self.low_open, self.high_open, self.negate]


@dataclass(frozen=True)
class Filter:
    """Conditions that must all hold."""

    conditions: tuple[Condition, ...] = ()

    @classmethod
    def of(cls, value: "Filter | Mapping[str, str] | None") -> Optional["Filter"]:
        """A Filter from a Filter, a {key: value} equality dict, or None (no filter)."""
        if value is None or isinstance(value, Filter):
            return value or None
        return cls(tuple(Condition(k, (v,)) for k, v in sorted(value.items()))) or None

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def holds(self, metadata: Mapping[str, str], added_at: float, schema: Schema) -> bool:
        return all(c.holds(metadata, added_at, schema) for c in self.conditions)

    def key(self) -> list:
        return [c.key() for c in self.conditions]


def check_condition(condition: Condition, schema: Schema) -> Condition:
    """QueryInputError for a range over a field that is not a number or a date."""
    if not condition.field or len(condition.field) > MAX_FIELD_CHARS:
        raise QueryInputError(f"condition field {condition.field[:40]!r}: field names are 1..{MAX_FIELD_CHARS} characters")
    if condition.is_range and schema.type_of(condition.field) not in TYPED:
        raise QueryInputError(f"range on {condition.field!r}: ranges need added_at or a field the collection schema "
                              f"declares number or date (service option --field {condition.field}:number)")
    return condition


# ---------------------------------------------------------------- order
@dataclass(frozen=True)
class Order:
    field: str
    descending: bool = False

    def key(self) -> list:
        return [self.field, self.descending]


def check_order(order: Order, schema: Schema) -> Order:
    if schema.type_of(order.field) not in TYPED:
        raise QueryInputError(f"order by {order.field!r}: order by added_at or a field the collection schema "
                              f"declares number or date (service option --field {order.field}:date)")
    return order


# ---------------------------------------------------------------- page tokens
def fingerprint(*parts) -> str:
    """A short digest of what identifies a query (everything but the page token)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_jsonable).encode()).hexdigest()[:24]


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(type(value).__name__)


BAD_TOKEN = "page_token is not one this service made (pass next_page_token back unchanged)"


def encode_token(query: str, position: dict) -> str:
    raw = json.dumps({"q": query, **position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: str) -> dict:
    """The position a token of this query resumes from; QueryInputError if it is not one."""
    if len(token) > MAX_TOKEN_CHARS:
        raise QueryInputError(f"page_token is {len(token)} characters, longer than any this service makes")
    try:
        position = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise QueryInputError(BAD_TOKEN) from None
    if not isinstance(position, dict) or position.get("q") != query:
        raise QueryInputError("page_token belongs to another query: page with the same text/image, conditions, "
                              "order and k as the first page")
    return position
