"""The exceptions the client raises: one class per gRPC status a caller may want to handle.

    try:
        client.get("nope")
    except NotFound as exc:
        print(exc.code.name, exc.details)     # NOT_FOUND no item with id 'nope'

Every error carries `code` (a grpc.StatusCode), `details` (the server's message), `method` and `target`;
str(exc) reads as one helpful line, with a hint where the fix is usually the same.
"""
from __future__ import annotations

from typing import Optional

import grpc


class SearchError(Exception):
    """A failed call to the search service."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "", target: str = "",
                 attempts: int = 1, retry_after: Optional[float] = None):
        self.code = code
        self.details = details or ""
        self.method = method
        self.target = target
        self.attempts = attempts
        self.retry_after = retry_after  # seconds, when the server shed the call and said when to ask again
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.method} on {self.target}" if self.method else self.target or "call"
        text = f"{where}: {self.code.name}: {self.details or '(no message)'}"
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        hint = self.hint()
        return f"{text}. {hint}" if hint else text

    def hint(self) -> str:
        return ""


class InvalidArgument(SearchError):
    """Bad input: empty text, bad k, unreadable or oversized image, bad sampling settings."""


class NotFound(SearchError):
    """Unknown id, or a server-side path that does not exist."""


class AlreadyExists(SearchError):
    """An explicit id already names different content."""


class PermissionDenied(SearchError):
    """A server-side path outside the server's configured roots."""


class Unauthenticated(SearchError):
    """Missing or wrong bearer token."""

    def hint(self) -> str:
        return "Pass token=... (CLI: --token-file FILE or COCA_SEARCH_TOKEN)"


class ResourceExhausted(SearchError):
    """A message or image over the server's size limits, or the service shed the call (busy: then
    `retry_after` says when to ask again, and the client has already retried within the deadline)."""


class FailedPrecondition(SearchError):
    """The store was built with another model than the one Triton serves."""


class Unavailable(SearchError):
    """The service (or the Triton server behind it) cannot be reached; retried before it is raised."""

    def hint(self) -> str:
        lowered = self.details.lower()
        if "connect" in lowered or "connection refused" in lowered or "dns" in lowered:
            return "Is the search service running there? Start one with `coca serve`"
        if "triton" in lowered:
            return "The model server is down or starting; try again shortly"
        return ""


class DeadlineExceeded(SearchError):
    """The call did not finish within its deadline."""

    def hint(self) -> str:
        return "Give it a longer deadline (timeout=..., CLI: --timeout)"


class Cancelled(SearchError):
    """The call was cancelled (by the client, or the server went away mid-call)."""


class Internal(SearchError):
    """A server-side bug (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED)."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
    grpc.StatusCode.UNIMPLEMENTED: Internal,
}


def error_class(code: grpc.StatusCode) -> type[SearchError]:
    return _BY_CODE.get(code, SearchError)


def from_rpc_error(exc: grpc.RpcError, method: str = "", target: str = "", attempts: int = 1) -> SearchError:
    """The typed error for a grpc.RpcError (sync or aio)."""
    code: Optional[grpc.StatusCode] = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = code or grpc.StatusCode.UNKNOWN
    return error_class(code)(code, details or "", method, target, attempts, retry_after(exc))


RETRY_AFTER_KEY = "retry-after-ms"  # the service's hint on a shed call (search_service/admission.py)


def retry_after(exc: grpc.RpcError) -> Optional[float]:
    """Seconds the server asked the caller to wait before asking again (trailing metadata retry-after-ms),
    or None when it gave no hint (then RESOURCE_EXHAUSTED is final: e.g. a message over the size limit)."""
    try:
        trailing = exc.trailing_metadata() or ()
    except Exception:  # an error that is no call (raised before one started)
        return None
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def status_code(value: int) -> grpc.StatusCode:
    """grpc.StatusCode from its number (what AddImageResult.error.code holds)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
