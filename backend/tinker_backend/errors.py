"""The one error type the backend raises on purpose: an HTTP-style status and a clear message."""

from __future__ import annotations


class ServiceError(Exception):
    """A request cannot be served. ``status`` is HTTP-style (400 bad input, 404 unknown id, ...);
    ``category`` is "user" for the caller's mistakes and "server" for ours."""

    def __init__(self, status: int, message: str, category: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.category = category or ("user" if status < 500 else "server")


def as_service_error(error: Exception) -> ServiceError:
    """A ``ServiceError`` as is; a validation error (``tinker.validation.InvalidInput``, or any
    ``ValueError`` naming its field) as a 400 with the same message."""
    return error if isinstance(error, ServiceError) else ServiceError(400, str(error))
