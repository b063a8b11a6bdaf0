"""Zero-shot prompts: a template with one `{}` filled with each label."""
from __future__ import annotations

import string
from typing import Sequence

from .errors import InvalidInputError

DEFAULT_TEMPLATE = "This is a photo of a {}"


def label_prompts(template: str, labels: Sequence[str]) -> list[str]:
    """`template` with each label in its `{}`; InvalidInputError unless it has exactly that one field."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:  # an unmatched brace
        raise InvalidInputError(f"template {template!r} does not parse: {exc} (write a literal brace as {{{{ or }}}})") from exc
    if fields != [("", "", None)]:
        raise InvalidInputError(f"template {template!r} must have exactly one '{{}}' where the label goes, "
                                "and no other {...} field")
    return [template.format(label) for label in labels]
