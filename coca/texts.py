"""The texts the text tower takes: what makes one usable, checked the same way in process, in
Triton's text encoder and in the search service (which answers INVALID_ARGUMENT before any model call).

The bound on length protects the tokenizer: open_clip's BPE is quadratic in the length of a word
(1,000 random letters take ~0.8 s, 10,000 take ~30 s) and caches every distinct word it sees.
The model reads only the first 75 tokens (a few hundred characters of prose) of any text.
"""
from __future__ import annotations

from .errors import InvalidTextError

MAX_TEXT_CHARS = 1000


def check_text(text: object, what: str = "text", max_chars: int = MAX_TEXT_CHARS) -> str:
    """`text` if it is a non-blank str of at most `max_chars` characters; InvalidTextError naming `what` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidTextError(f"{what} is empty: give at least one word")
    if len(text) > max_chars:
        raise InvalidTextError(f"{what} is {len(text)} characters long, over the limit of {max_chars} "
                               "(the model reads only its first 75 tokens)")
    return text
