"""Errors of talking to a Triton server. Invalid input and a full cache stay coca's own
(coca.InvalidInputError, coca.CapacityError), so callers handle them the same in process or not."""
from coca.errors import CocaError


class TritonUnavailableError(CocaError):
    """The server cannot be reached, or is not ready (not started, still loading, stopped)."""


class IdentityMismatchError(CocaError):
    """The server holds another model or other weights than the caller expects."""


class TritonRequestError(CocaError):
    """The server answered with an error that is not the caller's input (internal, unknown sequence)."""


class SequenceLostError(TritonRequestError):
    """The decoder no longer knows a caption's sequence (dropped after its idle limit): the caption is lost."""


class TritonServerError(RuntimeError):
    """The server could not be found, started, or made ready. The message carries the log tail."""
