"""The ranking client's own exceptions, so callers never handle tritonclient's `InferenceServerException`.

Each error carries the server's message, the gRPC status and the endpoint that answered, so a log line tells what
went wrong and where. `to_client_error` turns tritonclient's exceptions into these.
"""

from __future__ import annotations

from fusionrank.errors import FusionRankError


class ClientError(FusionRankError):
    """Base of every error the ranking client raises."""

    def __init__(self, message: str, status: str | None = None, endpoint: str | None = None):
        self.server_message = message
        self.status = status
        self.endpoint = endpoint
        where = f" [{endpoint}]" if endpoint else ""
        code = f" ({status})" if status else ""
        super().__init__(f"{message}{code}{where}")


class InvalidInputError(ClientError):
    """The request was rejected as invalid (INVALID_ARGUMENT): never retried, the same request would fail again."""


class UnavailableError(ClientError):
    """No endpoint could serve the request (unavailable, connection refused or reset) after every retry."""


class DeadlineExceededError(ClientError):
    """The call's deadline passed before a response arrived."""


class ServerError(ClientError):
    """The server answered with any other error (internal error, unknown model, ...)."""


# Substrings of error messages that mean the endpoint cannot serve right now rather than the request being bad:
# the connection broke (RST, GOAWAY), or the server is shutting down: while it drains, Triton unloads the models and
# answers NOT_FOUND "Request for unknown model: 'rank' has no available versions". Another endpoint can serve the
# same (idempotent) ranking request.
_ENDPOINT_UNAVAILABLE = ("connection reset", "socket closed", "broken pipe", "failed to connect", "connection refused",
                         "goaway", "stream removed", "has no available versions", "server is stopping",
                         "shutting down")


def to_client_error(exc: Exception, endpoint: str | None = None) -> ClientError:
    """Map a tritonclient `InferenceServerException` (or gRPC error) to the client's own exception type."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    message = message or str(exc)
    status = str(status) if status else None
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidInputError(message, status, endpoint)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceededError(message, status, endpoint)
    if status == "StatusCode.UNAVAILABLE" or any(m in message.lower() for m in _ENDPOINT_UNAVAILABLE):
        return UnavailableError(message, status, endpoint)
    return ServerError(message, status, endpoint)
