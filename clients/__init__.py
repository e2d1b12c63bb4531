"""gRPC clients of the fusionrank ensemble: `RankingClient` (sync), `AsyncRankingClient` (asyncio), their errors."""

from clients.errors import (
    ClientError,
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    UnavailableError,
)
from clients.ranking_client import AsyncRankingClient, Candidate, RankingClient, RankingResult, RetryPolicy

__all__ = ["AsyncRankingClient", "Candidate", "ClientError", "DeadlineExceededError", "InvalidInputError",
           "RankingClient", "RankingResult", "RetryPolicy", "ServerError", "UnavailableError"]
