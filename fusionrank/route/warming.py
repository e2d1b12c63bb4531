"""Catalogue warming (`fusionrank embed-catalogue`): pre-compute item embeddings into the route's shared cache tier
(Redis), so the first requests after a deployment find the catalogue's items already encoded.

The path is the route's own, so the keys and values are what the route would compute and store:
- keys from `fusionrank.route.item_keys`, over the files the running profile serves from the repository (the
  route config's `member_files` parameter, read from the repository, as the served route reads it);
- validation and preprocessing by `RequestPreprocessor.encoder_groups` (text padded per row, non-finite refused);
- embeddings from the served encoder models over gRPC (the models the route calls through BLS);
- only finite float32 rows stored, through the route's own shared tier (`fusionrank.route.cache.RedisTier`), with
  the spec's expiry.

Items already in the store are skipped (a rerun costs one EXISTS per item); an item that fails validation or
encodes to a non-finite value is reported and skipped (the route would refuse it too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fusionrank.contract.errors import FusionRankError, PreprocessError
from fusionrank.contract.names import encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import Modality, PipelineSpec, Priority, ServingProfile
from fusionrank.contract.tensors import ITEM_INPUT, embedding_name, infer_inputs
from fusionrank.request.validation import EncoderGroup, RequestPreprocessor, ValidRequest, non_finite_row
from fusionrank.route.cache import RedisTier, stored_value
from fusionrank.route.item_keys import encoder_identities, route_member_files


class EmbedError(FusionRankError):
    """The catalogue could not be embedded (no store, the store or the server unreachable)."""


@dataclass
class EmbedReport:
    """What one run did, per modality: rows stored, rows already present, and the items refused (with why)."""

    items: int = 0
    stored: dict[Modality, int] = field(default_factory=dict)
    present: dict[Modality, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        per = ", ".join(f"{m.value} {self.stored.get(m, 0)} stored / {self.present.get(m, 0)} present"
                        for m in self.stored)
        return (f"embedded {self.items} items in {self.seconds:.1f} s: {per}; {len(self.refused)} refused"
                + "".join(f"\n  refused: {r}" for r in self.refused[:10]))


class CatalogueItem(Protocol):
    """An item to embed: its id, and its raw payload per modality (None: it has none; a bad payload, such as an
    unreadable file, raises a FusionRankError naming it). The client's `Candidate` is one."""

    item_id: object

    def payload(self, modality: Modality) -> bytes | None: ...


@dataclass(frozen=True)
class Item:
    """A catalogue item given by its payloads."""

    item_id: object
    payloads: Mapping[Modality, bytes]

    def payload(self, modality: Modality) -> bytes | None:
        return self.payloads.get(modality)


def benchmark_items(bench) -> list[Item]:
    """Every item of a synthetic catalogue (`fusionrank.model.synthetic_data.Benchmark`), as `Item`s."""
    items = (bench.item(i) for i in range(1, bench.num_items + 1))
    return [Item(it.item_id, {Modality.TEXT: it.text_bytes(), Modality.IMAGE: it.image_bytes(),
                              Modality.AUDIO: it.audio_bytes()}) for it in items]


class _Embedder:
    """One run's connections and per-modality state."""

    def __init__(self, spec: PipelineSpec, repo: Path, url: str, redis_url: str, profile: ServingProfile):
        import tritonclient.grpc as grpcclient  # the serving extra's client, only for this job

        self.spec = spec
        self.identities = encoder_identities(spec, repo, route_member_files(spec, repo, profile))
        self.preparer = RequestPreprocessor(spec, tokenizer_dir=tokenizer_dir(repo))
        # The route's tier with a patient timeout and no pause after an error: a failure here ends the job instead
        # of costing a miss, so every round trip is checked (`_check`).
        self.failures: list[str] = []
        self.store = RedisTier(redis_url, timeout_ms=10_000, retry_s=0.0, ttl_s=spec.serving.cache.redis_ttl_s,
                               log=self.failures.append)
        self.triton = grpcclient.InferenceServerClient(url)
        self.grpc = grpcclient
        self.report = EmbedReport()
        try:
            self.store.client.ping()
        except Exception as exc:  # redis errors, timeouts, OSError
            raise EmbedError(f"cannot reach the cache store {redis_url}: {exc}") from exc

    def _check(self) -> None:
        if self.failures:
            raise EmbedError(self.failures[-1])

    def close(self) -> None:
        self.store.close()
        self.triton.close()

    def chunk(self, items: Sequence[CatalogueItem]) -> None:
        """Embed one chunk of items, every modality."""
        pending = []
        for modality in self.spec.modalities.enabled:
            payloads, rows = self._payloads(items, modality)
            keys = {row: self.identities[modality].key(payloads[row]) for row in rows}
            found = self.store.get_many([keys[row] for row in rows])
            self._check()
            missing = [row for row, value in zip(rows, found) if value is None]
            self.report.present[modality] = self.report.present.get(modality, 0) + len(rows) - len(missing)
            stored = self._encode(modality, items, payloads, missing)
            pending += [(keys[row], value) for row, value in stored]
            self.report.stored[modality] = self.report.stored.get(modality, 0) + len(stored)
        self.store.put_many([(key, stored_value(value)) for key, value in pending])
        self._check()
        self.report.items += len(items)

    def _payloads(self, items: Sequence[CatalogueItem], modality: Modality) -> tuple[list[bytes], list[int]]:
        payloads, rows = [], []
        for row, item in enumerate(items):
            try:
                payload = item.payload(modality)
                payloads.append(payload or b"")  # None: the item has none (a clip is not embedded: cover only)
                if payload is not None:
                    rows.append(row)
            except FusionRankError as exc:  # the item's own payload (an unreadable file, say)
                payloads.append(b"")
                self.report.refused.append(str(exc))
        return payloads, rows

    def _groups(self, modality: Modality, request: ValidRequest, rows: list[int],
                items: Sequence[CatalogueItem]) -> list[EncoderGroup]:
        """The route's preprocessing of `rows`; on a bad payload, row by row so the others still go through."""
        try:
            return self.preparer.encoder_groups(request, modality, rows)
        except PreprocessError:
            groups = []
            for row in rows:
                try:
                    groups += self.preparer.encoder_groups(request, modality, [row])
                except PreprocessError as exc:
                    self.report.refused.append(f"item {items[row].item_id}: {exc}")
            return groups

    def _encode(self, modality: Modality, items: Sequence[CatalogueItem], payloads: list[bytes],
                rows: list[int]) -> list[tuple[int, np.ndarray]]:
        model, name = encoder_name(modality), embedding_name(modality)
        request = ValidRequest(rows={ITEM_INPUT[modality]: payloads}, history=np.zeros((len(payloads), 1), np.int64))
        step = self.spec.serving.batching(model).max_batch_size
        out = []
        for group in self._groups(modality, request, rows, items):
            for start in range(0, len(group.rows), step):
                inputs = {n: a[start:start + step] for n, a in group.inputs.items()}
                # At the warm-up level: the route's calls (production) are served first by the encoder's queue.
                result = self.triton.infer(model, infer_inputs(self.grpc, inputs),
                                           outputs=[self.grpc.InferRequestedOutput(name)], client_timeout=120,
                                           priority=self.spec.serving.admission.level(Priority.WARMUP))
                values = result.as_numpy(name)
                for row, value in zip(group.rows[start:start + step], values):
                    if non_finite_row(value[None]) is None:
                        out.append((int(row), value))
                    else:
                        self.report.refused.append(f"item {items[row].item_id}: non-finite {name}")
        return out


def embed_catalogue(spec: PipelineSpec, repo: Path, url: str, redis_url: str | None = None,
                    profile: ServingProfile | str = ServingProfile.CPU, items: Sequence[CatalogueItem] = (),
                    chunk: int = 64, progress: bool = True) -> EmbedReport:
    """Embed `items` (a client's `Candidate`s, or `benchmark_items(bench)`) through the encoders served at `url`
    into the store at `redis_url` (default: the spec's `serving.cache.redis_url`)."""
    from tqdm import tqdm

    redis_url = redis_url or spec.serving.cache.redis_url
    if not redis_url:
        raise EmbedError("no cache store: pass --redis redis://host:port/db or set serving.cache.redis_url")
    items = list(items)
    started = time.perf_counter()
    embedder = _Embedder(spec, Path(repo), url, redis_url, ServingProfile(profile))
    try:
        with tqdm(total=len(items), desc="embed catalogue", unit="item", disable=not progress) as bar:
            for start in range(0, len(items), chunk):
                embedder.chunk(items[start:start + chunk])
                bar.update(len(items[start:start + chunk]))
    except Exception as exc:
        if isinstance(exc, FusionRankError):
            raise
        raise EmbedError(f"embedding the catalogue failed: {type(exc).__name__}: {exc}") from exc
    finally:
        embedder.close()
    embedder.report.seconds = time.perf_counter() - started
    return embedder.report
