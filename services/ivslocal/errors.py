"""Domain errors: API errors carry an IVS code and HTTP status; join errors carry a web SDK code."""

from __future__ import annotations


class IvsApiError(Exception):
    """An error the ivs-realtime API answers with; `code` goes into x-amzn-ErrorType (ivs-facts §2.1)."""

    code = "InternalServerException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(IvsApiError):
    code = "ValidationException"
    status = 400


class ResourceNotFoundError(IvsApiError):
    code = "ResourceNotFoundException"
    status = 404


class ConflictError(IvsApiError):
    code = "ConflictException"
    status = 409


class ServiceQuotaExceededError(IvsApiError):
    # IVS really answers 402 here; boto3 maps the code from the header, not the status.
    code = "ServiceQuotaExceededException"
    status = 402


class ThrottlingError(IvsApiError):
    code = "ThrottlingException"
    status = 429


class UnknownOperationError(IvsApiError):
    code = "UnknownOperationException"
    status = 404


class JoinError(Exception):
    """A participant cannot join a Stage; `sdk_code` is the web SDK's StageErrorCode (ivs-facts §5.3)."""

    name = "FAILED"
    sdk_code = 4

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenMalformedError(JoinError):
    name = "TOKEN_MALFORMED"
    sdk_code = 1


class TokenExpiredError(JoinError):
    name = "TOKEN_EXPIRED"
    sdk_code = 2


class StageAtCapacityError(JoinError):
    name = "STAGE_AT_CAPACITY"
    sdk_code = 6


class TokenNotAllowedError(JoinError):
    name = "TOKEN_NOT_ALLOWED"
    sdk_code = 8


class StageDeletedError(JoinError):
    name = "STAGE_DELETED"
    sdk_code = 9


class ParticipantDisconnectedError(JoinError):
    name = "PARTICIPANT_DISCONNECTED"
    sdk_code = 10


class JoinTimeoutError(JoinError):
    name = "TIMEOUT"
    sdk_code = 3
