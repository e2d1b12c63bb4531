"""Locust file: a gevent-safe gRPC user that sends ranking requests drawn from the benchmark catalogue.

Settings are Locust custom arguments (listed by `python -m loadtest.locust_setup`: Locust prints its `--help`
before loading this file, locustio/locust#2917; the master
sends them to its workers), each with a `FUSIONRANK_*` environment variable as its default: `--endpoints`,
`--spec`, `--scenario`, `--rate` (open loop), `--slo` and `--slo-gate`, `--samples-dir`, `--seed`, `--attempts`,
`--done-file`, `--progress-s`. Pacing, the gate and the progress line: `loadtest.locust_setup`. A distributed run:

    locust -f loadtest/locustfile.py --master --headless -u 32 -r 8 -t 2m --expect-workers 2 \\
        --endpoints host:8001 --rate 40 --slo loadtest/slo.ci.yaml
    locust -f loadtest/locustfile.py --worker --master-host <master>     (on each worker)

exits 1 when an SLO is missed or a gated percentile has too few samples.
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

import gevent  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from clients import NO_RETRY, ClientStats, RankingClient, RetryPolicy  # noqa: E402
from clients.errors import ClientError  # noqa: E402
from fusionrank.contract.spec import Priority, load_spec  # noqa: E402
from fusionrank.model.synthetic_data import load_benchmark  # noqa: E402
from fusionrank.request.scenario import RequestFactory, load_scenario  # noqa: E402
from loadtest import locust_setup  # noqa: E402

_users_started = itertools.count()
_shared: dict = {}  # per Locust process: spec, bench, scenario, pacing (set up on the first user's start)
_client_stats: list[ClientStats] = []  # every user's client's counters, summed when Locust quits


@events.init_command_line_parser.add_listener
def _arguments(parser, **_kwargs):
    locust_setup.add_arguments(parser)


def _worker_index(environment) -> int:
    return getattr(environment.runner, "worker_index", 0) or 0


def _setup(environment) -> dict:
    """Spec, benchmark, scenario and pacing, once per Locust process (on workers the options arrive with the
    master's first spawn message, so this cannot run at import or `init`)."""
    if "spec" not in _shared:
        options = environment.parsed_options
        spec = load_spec(options.spec or None)
        scenario = load_scenario(options.scenario or None)
        workers = options.expect_workers if isinstance(environment.runner, WorkerRunner) else 1
        pacing = locust_setup.pacing_for(options, scenario, workers, _worker_index(environment))
        if _shared.get("rate"):  # a capacity search's current step (loadtest/capacity_locustfile.py)
            pacing.set_rate(_shared["rate"])
        _shared.update(spec=spec, bench=load_benchmark(spec), scenario=scenario, pacing=pacing)
    return _shared


class _SampleLog:
    """Per-request records for the report's exact percentiles and histogram; one file per process."""

    def __init__(self):
        self._file = None
        self.folder = ""

    def write(self, start: float, latency_ms: float, candidates: int, ok: bool) -> None:
        if not self.folder:
            return
        if self._file is None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(self.folder) / f"samples-{os.getpid()}.csv", "a", buffering=1)
        self._file.write(f"{start:.6f},{latency_ms:.3f},{candidates},{int(ok)}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


SAMPLES = _SampleLog()


@events.test_start.add_listener
def _start(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    endpoint = (options.endpoints or environment.host or "").split(",")[0]
    problem = locust_setup.probe(endpoint) if endpoint else "no endpoint: pass --endpoints or --host"
    if problem:
        locust_setup.log.error("cannot load %s", problem)
        environment.process_exit_code = 2
        gevent.spawn_later(0, environment.runner.quit)
        return
    if options.progress_s > 0:
        _shared["progress"] = gevent.spawn(_progress, environment, options.progress_s, time.monotonic())


def _progress(environment, every_s: float, started: float) -> None:
    rate = environment.parsed_options.rate or None
    while True:
        gevent.sleep(every_s)
        line = locust_setup.progress_line(environment.stats.total, time.monotonic() - started,
                                          environment.runner.user_count, rate)
        print(line, flush=True)


@events.test_stop.add_listener
def _stop(environment, **_kwargs):
    if _shared.get("progress") is not None:
        _shared.pop("progress").kill(block=False)


@events.quitting.add_listener
def _quitting(environment, **_kwargs):
    SAMPLES.close()
    options = environment.parsed_options
    folder = options.samples_dir if options else ""
    if folder and Path(folder).is_dir():
        totals = {f.name: sum(getattr(s, f.name) for s in _client_stats) for f in dataclasses.fields(ClientStats)}
        (Path(folder) / f"client-stats-{os.getpid()}.json").write_text(json.dumps(totals))
        if _shared.get("pacing") is not None:
            (Path(folder) / f"pacing-{os.getpid()}.json").write_text(json.dumps(_shared["pacing"].counters()))
    if options is None or options.slo_gate != "on" or isinstance(environment.runner, WorkerRunner):
        return
    if environment.process_exit_code:  # the run could not start (no endpoint): nothing to gate
        return
    _gate(environment, options)


def _gate(environment, options) -> None:
    """The SLO verdict from Locust's aggregated statistics; exit code 1 when it fails."""
    from loadtest.report import Verdict, evaluate_slo, offered_pacing  # matplotlib-free, but only the master needs it
    from loadtest.slo import load_slo

    spec = load_spec(options.spec or None)
    scenario = load_scenario(options.scenario or None)
    targets = load_slo(spec, scenario.name, options.slo or None)
    users = environment.runner.user_count if not isinstance(environment.runner, MasterRunner) else None
    summary = locust_setup.summary_from_stats(environment.stats.total, users)
    pacing = _shared.get("pacing")
    if users is not None and pacing is not None:  # one process: its own schedule is the run's
        summary["pacing"] = offered_pacing([pacing.counters()])
    verdict = Verdict(evaluate_slo(targets, summary), summary, scenario=scenario.name, slo_source=targets.source)
    print(verdict.render(), flush=True)
    if not verdict.passed:
        environment.process_exit_code = 1


@events.quit.add_listener
def _mark_done(**_kwargs):
    # The results are written: the runner stops waiting for an exit that gRPC under gevent can delay (runner.py).
    done = _shared.get("done_file")
    if done:
        Path(done).touch()


class RankingUser(User):
    """One simulated caller: a ranking request per task, over gRPC, paced by `loadtest.locust_setup.Pacing`."""

    def wait_time(self):
        return self.pacing.wait()

    def on_start(self):
        shared = _setup(self.environment)
        options = self.environment.parsed_options
        spec, bench, scenario = shared["spec"], shared["bench"], shared["scenario"]
        self.pacing = shared["pacing"]
        SAMPLES.folder = options.samples_dir
        _shared["done_file"] = options.done_file
        url = options.endpoints or self.host
        if not url:
            raise RuntimeError("no endpoint: pass --endpoints or --host")
        # By default no retries: the load test measures what a caller sees on the first attempt, errors included.
        retry = NO_RETRY if options.attempts <= 1 else RetryPolicy(max_attempts=options.attempts)
        self.client = RankingClient(spec, url, timeout=scenario.timeout_s, retry=retry, priority=Priority.LOADTEST)
        _client_stats.append(self.client.stats)
        seed = options.seed + 100000 * _worker_index(self.environment) + next(_users_started)
        self.factory = RequestFactory(spec, bench, scenario, seed=seed)
        gevent.sleep(self.pacing.first_wait())  # no lockstep: users start spread over their first interval

    def on_stop(self):
        self.client.close()  # closes the user's gRPC channels

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
