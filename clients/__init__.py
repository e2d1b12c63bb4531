"""gRPC clients of the fusionrank route (the BLS model callers use, `serving.route`): `RankingClient` (sync),
`AsyncRankingClient` (asyncio), their errors.

A ranking request is one user's candidate list. Either client
- splits a list longer than the route's max batch into several requests and merges the scores back in order
  (`clients._request`);
- gives every call one deadline, shared by its chunks and retries, and abandons rather than cancels a late call,
  because Triton 2.51 crashes when clients cancel in-flight ensemble requests (`clients._base`);
- retries with exponential backoff only on transient errors, spreads calls round-robin over several endpoints and
  fails over at once (`clients._retry`, `clients._endpoints`);
- raises its own exceptions carrying the server's message (`clients.errors`);
- optionally sends large payloads through system shared memory to a server on the same host (`clients._transport`),
  with the server's admin key, which servers started by fusionrank require for it;
- talks plaintext or TLS, mutual TLS included (`clients.tls`).
"""

from clients._request import Candidate, RankingResult
from clients._retry import NO_RETRY, ClientStats, RetryPolicy
from clients.aio import AsyncRankingClient
from clients.errors import (
    AccessDeniedError,
    ClientError,
    DeadlineExceededError,
    InvalidInputError,
    OverCapacityError,
    ServerError,
    UnavailableError,
)
from clients.sync import RankingClient
from clients.tls import ClientTls

__all__ = ["AccessDeniedError", "AsyncRankingClient", "Candidate", "ClientError", "ClientStats", "ClientTls",
           "DeadlineExceededError", "InvalidInputError", "NO_RETRY", "OverCapacityError", "RankingClient",
           "RankingResult", "RetryPolicy", "ServerError", "UnavailableError"]
