"""`AsyncRankingClient`: the asyncio ranking client over `tritonclient.grpc.aio`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np

from clients._base import ClientBase, InvalidRows
from clients._endpoints import Endpoint
from clients._request import Candidate, Chunk, RankingResult, chunk_outputs, merge_outputs
from clients._retry import run_async
from clients._transport import ShmRegion, chunk_inputs, quietly_async, release_async
from clients.errors import InvalidInputError, probe_error, to_client_error
from fusionrank.contract.spec import Modality


class AsyncRankingClient(ClientBase):
    """asyncio ranking client over `tritonclient.grpc.aio`; chunks of one request are sent concurrently."""

    async def __aenter__(self) -> AsyncRankingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for abandoned calls (at most `abandon_grace` seconds), then close every gRPC channel."""
        pending, self._abandoned = self._abandoned, []
        if pending:
            await asyncio.wait(pending, timeout=self.options.abandon_grace_s)
        for client in self._take_clients():
            await quietly_async(client.close)

    async def wait_ready(self, timeout: float = 60.0, all_endpoints: bool = False) -> list[str]:
        """Wait until one endpoint (or every one) has the server and the route ready; returns the ready ones."""
        return await run_async(self.planner.readiness(self.options.model, timeout, all_endpoints), self._healthy)

    async def rank(self, candidates: Sequence[Candidate], history, timeout: float | None = None) -> RankingResult:
        """Score `candidates` for a user with `history` (their recent item ids, or a [N, L] array)."""
        items, videos = self._payloads(candidates)
        return await self.rank_payloads(items, history, timeout=timeout, videos=videos,
                                        ids=[c.item_id for c in candidates])

    async def rank_payloads(self, items: Mapping[Modality, Sequence[bytes | None]], history,
                            timeout: float | None = None, videos: Sequence[bytes | None] | None = None,
                            ids: Sequence | None = None) -> RankingResult:
        """Score raw payloads (None: the candidate has none; `videos`: one video or None per candidate; `ids`: the
        candidates' ids for errors); the chunks of a long candidate list run concurrently, merged in order."""
        timeout, deadline = self._begin(timeout)
        chunks = self._chunks(items, history, videos)
        done = await asyncio.gather(*(self._rank_chunk(chunk, deadline, timeout, ids) for chunk in chunks))
        errors = {row: e for _, chunk_errors in done for row, e in chunk_errors.items()}
        return merge_outputs([outputs for outputs, _ in done], self.options.modalities, errors)

    async def _rank_chunk(self, chunk: Chunk, deadline: float, timeout: float, ids: Sequence | None):
        """One chunk's (scores, weights) and the errors of the candidates dropped from it (`on_invalid`)."""
        rows = InvalidRows(chunk, ids, self.options.on_invalid == "drop")
        served = None
        while rows.live.rows:
            try:
                served = await run_async(self.planner.call(deadline, timeout), self._healthy,
                                         partial(self._infer, rows.live))
                break
            except InvalidInputError as exc:
                rows.failed(exc)
        return rows.outputs(served, len(self.options.modalities)), rows.errors

    def _new_client(self, url: str):
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(url, **self._channel_kwargs())

    async def _healthy(self, endpoint: Endpoint, timeout: float) -> bool:
        try:
            client = self._client(endpoint)
            return bool(await client.is_server_ready(client_timeout=timeout)
                        and await client.is_model_ready(self.options.model, client_timeout=timeout))
        except Exception as exc:  # any failure of the probe (refused, timed out, broken channel) means "not ready"
            endpoint.last_error = probe_error(exc)
            return False

    async def _infer(self, chunk: Chunk, endpoint: Endpoint, remaining: float) -> tuple[np.ndarray, np.ndarray]:
        """One attempt: send `chunk` to `endpoint` and wait at most `remaining` seconds for the answer."""
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException

        client = self._client(endpoint)
        shm = ShmRegion(chunk) if self._use_shm(endpoint, chunk) else None
        try:
            if shm is not None:
                await client.register_system_shared_memory(shm.name, shm.key, shm.byte_size,
                                                           headers=self._admin_headers, client_timeout=remaining)
            sent = asyncio.ensure_future(client.infer(self.options.model, chunk_inputs(aioclient, chunk, shm),
                                                      client_timeout=self.options.rpc_timeout(remaining),
                                                      **self.options.infer_kwargs(remaining)))
        except BaseException as exc:
            await release_async(client, shm, self._admin_headers)
            if isinstance(exc, InferenceServerException):
                raise to_client_error(exc, endpoint.url) from None
            raise
        try:
            done, _ = await asyncio.wait({sent}, timeout=max(remaining, 0.0))
        except asyncio.CancelledError:  # the caller gave up: leave the RPC to finish, as on a deadline
            self._abandon(sent, client, shm)
            raise
        if not done:
            self._abandon(sent, client, shm)
            raise self._abandoned_error(endpoint)
        await release_async(client, shm, self._admin_headers)
        try:
            return chunk_outputs(sent.result(), chunk)
        except InferenceServerException as exc:
            raise to_client_error(exc, endpoint.url) from None

    def _abandon(self, sent: asyncio.Future, client, shm: ShmRegion | None) -> None:
        """Leave `sent` running; release its shared memory when it ends; close() waits for it."""
        async def finish() -> None:
            try:
                await sent
            except Exception:  # nobody waits for this result any more, so its error goes nowhere
                pass
            finally:
                await release_async(client, shm, self._admin_headers)

        task = asyncio.ensure_future(finish())
        self._abandoned.append(task)
        task.add_done_callback(lambda t: self._abandoned.remove(t) if t in self._abandoned else None)
