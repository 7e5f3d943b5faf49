"""Every error the client raises, under one root.

    TinkerError
    ├── APIError
    │   ├── APIStatusError                (the server answered with an error status)
    │   │   ├── BadRequestError           400: invalid input; the message names the field
    │   │   ├── AuthenticationError       401
    │   │   ├── PermissionDeniedError     403
    │   │   ├── NotFoundError             404
    │   │   ├── ConflictError             409
    │   │   ├── UnprocessableEntityError  422
    │   │   ├── RateLimitError            429
    │   │   └── InternalServerError       >= 500
    │   └── APIConnectionError            the server could not be reached
    │       └── APITimeoutError
    └── RequestFailedError                a submitted request failed while it ran

Errors are plain exceptions with positional arguments only, so they pickle.
"""

from __future__ import annotations

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "TinkerError",
    "UnprocessableEntityError",
    "error_for_status",
]


class TinkerError(Exception):
    """Root of every error raised by the ``tinker`` client."""


class APIError(TinkerError):
    """A request to the server did not succeed."""


class APIStatusError(APIError):
    """The server answered with an error status; ``status_code`` says which."""

    status_code: int = 0

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.status_code))


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    status_code = 500


class APIConnectionError(APIError):
    """The server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class RequestFailedError(TinkerError):
    """A request was accepted but failed while it ran (``category``: "user", "server" or "unknown")."""

    def __init__(self, message: str, category: str = "unknown") -> None:
        super().__init__(message)
        self.category = category

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (str(self), self.category))


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        UnprocessableEntityError,
        RateLimitError,
    )
}


def error_for_status(status: int, message: str) -> APIStatusError:
    """The error subclass for an HTTP-style status code."""
    if status >= 500:
        return InternalServerError(message, status)
    return _BY_STATUS.get(status, APIStatusError)(message, status)
