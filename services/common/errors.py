"""Domain errors shared by the services; each transport maps them to its own status in one place."""

from __future__ import annotations

from enum import Enum

# Trailing metadata of a failed gRPC call: the service's snake_case error code and, where trying
# again makes sense, the seconds to wait. The gRPC servers set them; the gateway reads them.
ERROR_CODE_METADATA = "fanout-error-code"
RETRY_AFTER_METADATA = "retry-after"


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    NO_CAPACITY = "no_capacity"
    UNAVAILABLE = "unavailable"


class FanoutError(Exception):
    """An expected failure whose message is safe to show a user (never a token or key)."""

    kind: ErrorKind = ErrorKind.FAILED_PRECONDITION
    default_code = "failed_precondition"

    def __init__(self, message: str, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retry_after = retry_after


class InvalidArgument(FanoutError):
    kind = ErrorKind.INVALID_ARGUMENT
    default_code = "invalid_argument"


class NotFound(FanoutError):
    kind = ErrorKind.NOT_FOUND
    default_code = "not_found"


class NoCapacity(FanoutError):
    """Nothing can take the request now; retry_after says when trying again makes sense."""

    kind = ErrorKind.NO_CAPACITY
    default_code = "no_capacity"


class Unavailable(FanoutError):
    kind = ErrorKind.UNAVAILABLE
    default_code = "unavailable"
