"""Locust file: a gevent-safe gRPC user that sends ranking requests drawn from the benchmark catalogue.

Configured by environment variables (set by `fusionrank loadtest`; set them yourself for a distributed run, see
docs/loadtest.md):

- FUSIONRANK_LOADTEST_URL  gRPC endpoint(s), comma-separated (else Locust's --host)
- FUSIONRANK_SPEC          pipeline spec (default: the project's pipeline.yaml, else the packaged one)
- FUSIONRANK_SCENARIO      scenario YAML or name (default: the packaged `default` scenario)
- FUSIONRANK_LOADTEST_USERS  total users, to split a target request rate between them (default: the scenario's)
- FUSIONRANK_LOADTEST_SAMPLES  folder for per-request samples (one CSV per process); unset: none recorded
- FUSIONRANK_LOADTEST_SEED  base seed of the request streams (default 0): user k of worker w draws from seed
  base + 100000 * w + k, so a run's request mix repeats, and workers of a distributed run differ
- FUSIONRANK_LOADTEST_ATTEMPTS  attempts per request (default 1: what a caller sees on the first attempt); more
  lets each user's client retry and fail over as a service would (fault tests); the clients' retry and failover
  counts are written beside the samples as `client-stats-<pid>.json`
- FUSIONRANK_LOADTEST_DONE  a file touched when Locust has written its results (its `quit` event)
"""

# gRPC's C core must cooperate with gevent before any channel exists, or greenlets block each other on I/O.
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from locust import User, constant, constant_throughput, events, task  # noqa: E402

from clients import NO_RETRY, ClientStats, RankingClient, RetryPolicy  # noqa: E402
from clients.errors import ClientError  # noqa: E402
from fusionrank.contract.spec import Priority, load_spec  # noqa: E402
from fusionrank.model.synthetic_data import load_benchmark  # noqa: E402
from fusionrank.request.scenario import RequestFactory, load_scenario  # noqa: E402

ENV_URL = "FUSIONRANK_LOADTEST_URL"
ENV_SPEC = "FUSIONRANK_SPEC"
ENV_SCENARIO = "FUSIONRANK_SCENARIO"
ENV_USERS = "FUSIONRANK_LOADTEST_USERS"
ENV_SAMPLES = "FUSIONRANK_LOADTEST_SAMPLES"
ENV_SEED = "FUSIONRANK_LOADTEST_SEED"
ENV_ATTEMPTS = "FUSIONRANK_LOADTEST_ATTEMPTS"
ENV_DONE = "FUSIONRANK_LOADTEST_DONE"

SCENARIO = load_scenario(os.environ.get(ENV_SCENARIO) or None)
_USERS = int(os.environ.get(ENV_USERS) or SCENARIO.users)
_users_started = itertools.count()
_shared: dict = {}


def _spec_and_bench():
    """Spec and benchmark, loaded once per Locust process (the benchmark comes from the cache)."""
    if not _shared:
        spec = load_spec(os.environ.get(ENV_SPEC) or None)
        _shared.update(spec=spec, bench=load_benchmark(spec))
    return _shared["spec"], _shared["bench"]


class _SampleLog:
    """Per-request records for the report's exact percentiles and histogram; one file per process."""

    def __init__(self):
        self._file = None

    def write(self, start: float, latency_ms: float, candidates: int, ok: bool) -> None:
        folder = os.environ.get(ENV_SAMPLES)
        if not folder:
            return
        if self._file is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(folder) / f"samples-{os.getpid()}.csv", "a", buffering=1)
        self._file.write(f"{start:.6f},{latency_ms:.3f},{candidates},{int(ok)}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


SAMPLES = _SampleLog()


_client_stats: list[ClientStats] = []  # every user's client's counters, summed when Locust quits


@events.quitting.add_listener
def _close_samples(**_kwargs):
    SAMPLES.close()
    folder = os.environ.get(ENV_SAMPLES)
    if folder and _client_stats:
        totals = {f.name: sum(getattr(s, f.name) for s in _client_stats) for f in dataclasses.fields(ClientStats)}
        (Path(folder) / f"client-stats-{os.getpid()}.json").write_text(json.dumps(totals))


@events.quit.add_listener
def _mark_done(**_kwargs):
    # The results are written: the runner stops waiting for an exit that gRPC under gevent can delay (runner.py).
    if os.environ.get(ENV_DONE):
        Path(os.environ[ENV_DONE]).touch()


class RankingUser(User):
    """One simulated caller: a ranking request per task, over gRPC, with the scenario's pacing."""

    if SCENARIO.pacing.mode == "target_rps":
        wait_time = constant_throughput(SCENARIO.pacing.target_rps / _USERS)
    else:
        wait_time = constant(SCENARIO.pacing.think_time_s)

    def on_start(self):
        spec, bench = _spec_and_bench()
        url = os.environ.get(ENV_URL) or self.host
        if not url:
            raise RuntimeError(f"no endpoint: set {ENV_URL} or pass --host")
        # By default no retries: the load test measures what a caller sees on the first attempt, errors included.
        attempts = int(os.environ.get(ENV_ATTEMPTS) or 1)
        retry = NO_RETRY if attempts == 1 else RetryPolicy(max_attempts=attempts)
        self.client = RankingClient(spec, url, timeout=SCENARIO.timeout_s, retry=retry, priority=Priority.LOADTEST)
        _client_stats.append(self.client.stats)
        worker = getattr(self.environment.runner, "worker_index", 0) or 0
        seed = int(os.environ.get(ENV_SEED) or 0) + 100000 * worker + next(_users_started)
        self.factory = RequestFactory(spec, bench, SCENARIO, seed=seed)

    def on_stop(self):
        self.client.close()

    @task
    def rank(self):
        request = self.factory.next()
        n = len(request)
        started = time.time()
        t0 = time.perf_counter()
        error = None
        try:
            self.client.rank_payloads(request.items, request.history, videos=request.videos)
        except ClientError as exc:
            error = exc
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self.environment.events.request.fire(request_type="grpc", name=f"rank[{n}]", response_time=latency_ms,
                                             response_length=n, exception=error, context={"candidates": n})
        SAMPLES.write(started, latency_ms, n, error is None)
