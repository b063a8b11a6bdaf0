"""Typed errors. Every message says what was wrong and where, in plain words.

Callers (CLI, Triton models, the search service) map these to exit code 2 /
INVALID_ARGUMENT / NOT_FOUND without parsing messages.
"""


class CocaError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(CocaError, ValueError):
    """The caller gave something we cannot use (bad image, empty text, bad option)."""


class InvalidImageError(InvalidInputError):
    """Unreadable, truncated, oversized or non-image data."""


class InvalidVideoError(InvalidInputError):
    """A video with no decodable frames, or not a video at all."""


class InvalidTextError(InvalidInputError):
    """Empty or otherwise unusable text."""


class GenerationError(InvalidInputError):
    """One caption could not go on: its scores were NaN or infinite (an out-of-range input). Only
    that caption fails; the others decoded in the same batch are unaffected."""


class UnknownModelError(CocaError, LookupError):
    """A model name or pretrained tag that does not exist."""


class WeightsUnavailableError(CocaError):
    """Known pretrained tag whose weights cannot be fetched (offline, no cache)."""


class CapacityError(CocaError):
    """Too many live decoding sequences for the preallocated cache."""
