"""The ranking client's own exceptions, so callers never handle tritonclient's `InferenceServerException`.

Each error carries the server's message, the gRPC status and the endpoint that answered, so a log line tells what
went wrong and where. `to_client_error` turns tritonclient's exceptions into these.
"""

from __future__ import annotations

import re

from fusionrank.contract.errors import FusionRankError


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
    """The request was rejected as invalid (INVALID_ARGUMENT): never retried, the same request would fail again.

    `input` is the input the server named (`item_image`, `user_history`, `request` for a per-request budget, ...),
    `row` the candidate's index in the caller's list when the error concerns one candidate (else None) and
    `candidate_id` that candidate's `item_id`. The server writes `<input>[<row>]: <problem>`."""

    def __init__(self, message: str, status: str | None = None, endpoint: str | None = None, *,
                 input: str | None = None, row: int | None = None, candidate_id=None):
        super().__init__(message, status, endpoint)
        self.input, self.row, self.candidate_id = input, row, candidate_id
        if input is None:
            self.input, self.row = parse_input(message)

    def in_request(self, index, ids=None) -> InvalidInputError:
        """The same error with `row` counted in the caller's whole list (`index`: the caller's index of each row
        of the request that failed) and the candidate's id from `ids` (the caller's item ids by index)."""
        if self.row is None or self.row >= len(index):
            return self
        row = int(index[self.row])
        return InvalidInputError(self.server_message, self.status, self.endpoint, input=self.input, row=row,
                                 candidate_id=ids[row] if ids is not None and row < len(ids) else None)


class UnavailableError(ClientError):
    """No endpoint could serve the request (unavailable, connection refused or reset) after every retry."""


class OverCapacityError(UnavailableError):
    """The server refused the request because it is past its capacity (a full queue, the deadline passed while
    queued): retried with backoff, on another endpoint when there is one."""


class DeadlineExceededError(ClientError):
    """The call's deadline passed before a response arrived."""


class ServerError(ClientError):
    """The server answered with any other error (internal error, unknown model, ...)."""


class AccessDeniedError(ClientError):
    """The server restricts the API to callers holding its admin key (shared memory, model control): never retried,
    another endpoint would refuse too."""


# Substrings of error messages that mean the endpoint cannot serve right now rather than the request being bad:
# the connection broke (RST, GOAWAY), or the server is shutting down: while it drains, Triton unloads the models and
# answers NOT_FOUND "Request for unknown model: 'rank' has no available versions". Another endpoint can serve the
# same (idempotent) ranking request.
_ENDPOINT_UNAVAILABLE = ("connection reset", "socket closed", "broken pipe", "failed to connect", "connection refused",
                         "goaway", "stream removed", "has no available versions", "server is stopping",
                         "shutting down")


# Triton refuses a restricted API with UNAVAILABLE and this message: not transient, the caller lacks the key.
_RESTRICTED = "protocol is restricted"
# How gRPC reports a connection that TLS (or its absence) broke, and what to tell the caller.
_TLS_HINTS = (("handshake failed", "TLS handshake failed: check the CA the client trusts (root_certificates), the "
                                   "name the certificate was issued for (server_name) and the client certificate"),
              ("socket closed", "the endpoint closed the connection while it was being set up: a TLS endpoint does "
                                "that to a plaintext client (pass tls=ClientTls(...)), a mutual-TLS endpoint to a "
                                "client without a certificate"))


# Triton's refusals when a model's queue is full or a request waited past its timeout (`default_queue_policy`,
# Triton 2.51), and the route's own refusal of a request whose deadline passed (fusionrank.route.stages.LATE).
_OVER_CAPACITY = ("exceeds maximum queue size", "request timeout expired", "the server is over capacity")
_INPUT_ROW = re.compile(r"^\s*([A-Za-z_][\w.]*)(?:\[(\d+)\])?:")


def parse_input(message: str) -> tuple[str | None, int | None]:
    """(input, row) of a server message `<input>[<row>]: <problem>` (row None without an index; both None when the
    message names no input)."""
    match = _INPUT_ROW.match(message or "")
    if match is None:
        return None, None
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def connection_hint(message: str) -> str:
    """`message` with a hint appended when it is how gRPC reports a TLS mismatch."""
    lowered = message.lower()
    for marker, hint in _TLS_HINTS:
        if marker in lowered and "failed to connect" in lowered:
            return f"{message} ({hint})"
    return message


def probe_error(exc: Exception) -> str:
    """Why a health check failed, in words (with a TLS hint where it fits), for wait_ready's error."""
    message = exc.message() if callable(getattr(exc, "message", None)) else ""
    return connection_hint(message or str(exc) or type(exc).__name__)


def to_client_error(exc: Exception, endpoint: str | None = None) -> ClientError:
    """Map a tritonclient `InferenceServerException` (or gRPC error) to the client's own exception type."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    message = connection_hint(message or str(exc))
    status = str(status) if status else None
    if _RESTRICTED in message.lower():
        return AccessDeniedError(f"{message}: the server restricts this API to callers holding its admin key "
                                 f"(admin_key=...)", status, endpoint)
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidInputError(message, status, endpoint)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceededError(message, status, endpoint)
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED") and any(
            m in message.lower() for m in _OVER_CAPACITY):
        return OverCapacityError(f"server over capacity: {message}", status, endpoint)
    if status == "StatusCode.UNAVAILABLE" or any(m in message.lower() for m in _ENDPOINT_UNAVAILABLE):
        return UnavailableError(message, status, endpoint)
    return ServerError(message, status, endpoint)
