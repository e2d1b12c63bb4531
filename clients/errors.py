"""The ranking client's own exceptions, so callers never handle tritonclient's `InferenceServerException`.

Each error carries the server's message, the gRPC status and the endpoint that answered, so a log line tells what
went wrong and where.
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
