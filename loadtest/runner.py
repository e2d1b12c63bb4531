"""`fusionrank loadtest`: run Locust headless against an endpoint, gate on the SLOs, write the report.

Locust runs as a subprocess in its own session (`python -m locust -f loadtest/locustfile.py --headless ...`) under
an outer timeout of run time + grace; on expiry the whole process group is killed, so the command always ends by
itself and leaves nothing running. Triton's metrics are scraped before and after for the per-member breakdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import server_metrics as triton_metrics
from clients import RankingClient
from clients.errors import ClientError
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import project_dir, reports_dir
from fusionrank.contract.spec import PipelineSpec, Priority, ServingProfile, served_models
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, Scenario, load_scenario, parse_duration
from fusionrank.server.launcher import TritonServer
from loadtest.analysis import compare_runs, pacing_summary, run_provenance, write_arrival_plot
from loadtest.locust_setup import probe
from loadtest.report import (
    Verdict,
    evaluate_slo,
    read_samples,
    summarize_locust_csv,
    summarize_samples,
    sustained_rps,
    write_plots,
    write_summary,
)
from loadtest.slo import Slo, load_slo

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
STOP_TIMEOUT_S = 5
# Locust start-up (imports, benchmark from the cache) and shutdown on top of the run time, before it is killed.
GRACE_S = 45.0
# Locust's gRPC channels under gevent can keep its interpreter from exiting after a server they used was killed: in 3
# of 5 runs of tests/integration/test_faults.py it hung ~50 s after printing its summary. Once it has written its
# results (loadtest/locustfile.py touches DONE_MARKER at its `quit` event, before closing the CSV files) it gets this
# long.
EXIT_GRACE_S = 10.0
DONE_MARKER = "locust-done"
ENV_METRICS_URL = "FUSIONRANK_METRICS_URL"


class LoadTestError(FusionRankError):
    """The load test could not run (endpoint not ready, Locust failed or produced no results)."""


@dataclass(frozen=True)
class LocustRun:
    returncode: int | None  # None: killed after the outer timeout, or after it hung at exit
    wall_s: float
    log_file: Path
    hung_at_exit: bool = False  # it had written its results (DONE_MARKER) but did not exit


def default_out_dir() -> Path:
    """`<project>/reports/loadtest-<time>`."""
    return reports_dir() / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"


def locust_command(out: Path, users: int, spawn_rate: float, run_time: str, url: str,
                   settings: dict[str, str] | None = None, locustfile: Path = LOCUSTFILE) -> list[str]:
    """Headless Locust over `url`; `settings` are the Locust file's custom arguments ({"rate": "4", ...})."""
    custom = [a for key, value in (settings or {}).items() for a in (f"--{key.replace('_', '-')}", str(value))]
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users),
            "-r", f"{spawn_rate:g}", "--run-time", run_time, "--host", url,
            "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
            "--stop-timeout", str(STOP_TIMEOUT_S), "--exit-code-on-error", "0", "--only-summary",
            "--loglevel", "WARNING", *custom]


def run_locust(cmd: list[str], env: dict[str, str] | None, timeout: float, log_file: Path,
               done_marker: Path | None = None, echo: Callable[[str], None] | None = None) -> LocustRun:
    """Run Locust in its own process group; kill the group if it outlives `timeout` seconds, or `EXIT_GRACE_S`
    after it wrote `done_marker` (its `quit` event: the results are written by then). `echo` gets every progress
    line Locust prints, as it prints it."""
    started = time.monotonic()
    deadline, done_at, code = started + timeout, None, None
    with log_file.open("w") as logf, log_file.open() as reader:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=project_dir())
        try:
            while code is None and time.monotonic() < deadline:
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    _echo_progress(reader, echo)
                    if done_at is None and done_marker is not None and done_marker.exists():
                        done_at = time.monotonic()
                    if done_at is not None and time.monotonic() - done_at > EXIT_GRACE_S:
                        log.warning("locust wrote its results but did not exit in %.0fs; killing it", EXIT_GRACE_S)
                        break
            if code is None and done_at is None:
                log.error("locust still running after %.0fs; killing its process group", timeout)
        except BaseException:  # Ctrl-C: never leave Locust behind
            _kill_group(proc)
            raise
        _kill_group(proc)  # also reaps workers Locust may have forked
        _echo_progress(reader, echo)
    return LocustRun(code, time.monotonic() - started, log_file, hung_at_exit=code is None and done_at is not None)


def _echo_progress(reader, echo: Callable[[str], None] | None) -> None:
    """Pass the progress lines Locust wrote since the last call to `echo`."""
    if echo is None:
        return
    for line in reader.readlines():
        if line.startswith("progress "):
            echo(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM Locust's process group, SIGKILL what is left after 5 s, and reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig is signal.SIGTERM:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def warm_up(spec: PipelineSpec, url: str, scenario: Scenario, ready_timeout: float = 60.0) -> None:
    """Fail within `CONNECT_TIMEOUT_S` when an endpoint refuses the connection; else wait for it to be ready and send
    the scenario's warm-up requests (not measured)."""
    for endpoint in url.split(","):
        problem = probe(endpoint)
        if problem:
            raise LoadTestError(f"endpoint {problem}")
    try:
        with RankingClient(spec, url, timeout=scenario.timeout_s, priority=Priority.LOADTEST) as client:
            client.wait_ready(ready_timeout)
            if scenario.warmup_requests:
                factory = RequestFactory(spec, load_benchmark(spec), scenario, seed=7)
                for _ in range(scenario.warmup_requests):
                    request = factory.next()
                    client.rank_payloads(request.items, request.history, videos=request.videos)
    except ClientError as exc:
        raise LoadTestError(f"endpoint {url} failed before the load test: {exc}") from exc


def _scrape_or_note(url: str | None, notes: list[str]) -> str | None:
    if not url:
        return None
    try:
        return triton_metrics.scrape(url)
    except triton_metrics.MetricsError as exc:
        notes.append(f"server breakdown skipped: {exc}")
        return None


def run_loadtest(spec: PipelineSpec, url: str, run_time: str = "30s", metrics_url: str | None = None,
                 scenario: str | Path | Scenario | None = None, slo: str | Path | Slo | None = None,
                 users: int | None = None, out: str | Path | None = None, spawn_rate: float | None = None,
                 attempts: int = 1, rate: float | None = None, baseline: str | Path | None = None,
                 progress: Callable[[str], None] | None = None, repository: Path | None = None) -> Verdict:
    """Load `url` with the scenario for `run_time` (None: the scenario's) and judge the run against the SLOs.
    `rate`: open loop at that many Poisson arrivals per second (users bound the requests in flight); `attempts`
    > 1 lets each Locust user's client retry and fail over; `baseline`: a previous run's report folder, compared
    by the measurement core's significance test; `progress` gets Locust's progress lines as they come;
    `repository`: the served model repository, whose files' digests the summary records."""
    scen = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    targets = slo if isinstance(slo, Slo) else load_slo(spec, scen.name, slo)
    run_time = run_time or scen.run_time
    run_s = parse_duration(run_time)
    users = users or scen.users
    # open loop: the arrival schedule sets the pace, so every user (a slot for a request in flight) starts at once
    spawn_rate = spawn_rate or (users if rate else scen.spawn_rate)
    out = Path(out) if out else default_out_dir()
    samples_dir = _fresh_samples_dir(out)
    notes: list[str] = []

    warm_up(spec, url, scen)
    before = _scrape_or_note(metrics_url, notes)
    settings = {"endpoints": url, "spec": spec.source if Path(spec.source).is_file() else "",
                "scenario": scen.source, "samples_dir": samples_dir, "attempts": attempts,
                "done_file": samples_dir / DONE_MARKER, "slo_gate": "off", "rate": rate or 0}
    cmd = locust_command(out, users, spawn_rate, run_time, url, settings)
    log.info("running %s", " ".join(cmd))
    run = run_locust(cmd, None, timeout=run_s + STOP_TIMEOUT_S + GRACE_S, log_file=out / "locust.log",
                     done_marker=samples_dir / DONE_MARKER, echo=progress)
    after = _scrape_or_note(metrics_url, notes) if before is not None else None
    samples, summary = _results(run, out, samples_dir, run_s, notes)
    summary.update(url=url, users=users, spawn_rate=spawn_rate, run_time=run_time, scenario=scen.name,
                   client=_client_stats(samples_dir), pacing=pacing_summary(samples_dir, samples))

    members, cache = [], None
    if before is not None and after is not None:
        members = triton_metrics.breakdown(before, after, served_models(spec))
        cache = triton_metrics.cache_share(before, after, spec.serving.route)
    elif not metrics_url:
        notes.append("no metrics URL: server-side breakdown skipped (pass --serve or set FUSIONRANK_METRICS_URL)")
    sustained = sustained_rps(summary)
    if sustained is not None:
        pacing = summary["pacing"]
        notes.append(f"throughput judged at the offered rate: {pacing['offered_rate']:g}/s x "
                     f"{summary['requests'] - summary['failures']} of {pacing['arrivals']} due arrivals answered = "
                     f"{sustained:.3g}/s ({summary['throughput_rps']:.3g} successful requests/s over the run)")
    verdict = Verdict(evaluate_slo(targets, summary), summary, members, out, notes, scen.name, targets.source, cache)
    verdict.provenance = run_provenance(spec, url, repository)
    if baseline:
        verdict.baseline = compare_runs(Path(baseline), samples, spec.upgrade.max_latency_regression)
    plots = write_plots(out, samples, out / "locust_stats_history.csv")
    plots += write_arrival_plot(out, samples, summary["pacing"])
    write_summary(verdict, out, plots)
    return verdict


def _fresh_samples_dir(out: Path) -> Path:
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    for old in [*samples_dir.glob("*.csv"), *samples_dir.glob("*.json"), samples_dir / DONE_MARKER]:
        old.unlink(missing_ok=True)
    return samples_dir


def _results(run: LocustRun, out: Path, samples_dir: Path, run_s: float, notes: list[str]):
    """The run's samples and summary (Locust's CSV when no samples came back); LoadTestError when Locust failed."""
    if run.hung_at_exit:
        notes.append(f"Locust wrote its results but did not exit within {EXIT_GRACE_S:.0f}s and was killed")
    elif run.returncode is None:
        notes.append(f"Locust did not end within {run_s + STOP_TIMEOUT_S + GRACE_S:.0f}s and was killed")
    elif run.returncode != 0:
        raise LoadTestError(f"locust exited with code {run.returncode}; log {run.log_file}:\n{_tail(run.log_file)}")
    samples = read_samples(samples_dir)
    if len(samples):
        return samples, summarize_samples(samples)
    if (out / "locust_stats.csv").is_file():
        notes.append("no per-request samples; figures from Locust's CSV (percentiles rounded)")
        return samples, summarize_locust_csv(out / "locust_stats.csv")
    raise LoadTestError(f"Locust produced no results; log {run.log_file}:\n{_tail(run.log_file)}")


def _client_stats(folder: Path) -> dict[str, int]:
    """The Locust processes' client counters (attempts, retries, failovers, ...), summed."""
    totals: dict[str, int] = {}
    for path in folder.glob("client-stats-*.json"):
        for name, value in json.loads(path.read_text()).items():
            totals[name] = totals.get(name, 0) + int(value)
    return totals


def _metrics_url_for(url: str) -> str | None:
    """FUSIONRANK_METRICS_URL, else Triton's default metrics port beside a default gRPC port (8001 -> 8002)."""
    if os.environ.get(ENV_METRICS_URL):
        return os.environ[ENV_METRICS_URL]
    first = url.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return f"http://{host}:8002/metrics" if port == "8001" and host else None


@contextlib.contextmanager
def endpoint(spec: PipelineSpec, url: str | None, serve_repository: Path | None, metrics_url: str | None, out):
    """(gRPC url, metrics url) of `url`, or of a CPU server started on `serve_repository` for the block."""
    if serve_repository is not None:
        with TritonServer.for_spec(spec, serve_repository, ServingProfile.CPU, log_name="tritonserver-loadtest") \
                as server:
            out.write(f"Triton ready: gRPC {server.grpc_url}, metrics {server.metrics_url}\n")
            out.flush()
            yield server.grpc_url, server.metrics_url
        return
    if not url:
        raise LoadTestError("no endpoint: pass --url HOST:PORT or --serve")
    yield url, metrics_url or _metrics_url_for(url)


def printer(out):
    """A progress callback writing whole lines to `out` as they come."""
    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()
    return say


def run_loadtest_command(spec: PipelineSpec, url: str | None = None, serve_repository: Path | None = None,
                         metrics_url: str | None = None, run_time: str | None = None,
                         scenario: str | Path | None = None, slo: str | Path | None = None, users: int | None = None,
                         spawn_rate: float | None = None, out_dir: Path | None = None, out=None,
                         rate: float | None = None, baseline: Path | None = None,
                         repository: Path | None = None) -> int:
    """`fusionrank loadtest`: load `url`, or a CPU server started on `serve_repository` for the run; print progress
    and the verdict; exit 1 when an SLO is missed (or a gated percentile has too few samples)."""
    out = out or sys.stdout
    kwargs = dict(run_time=run_time, scenario=scenario, slo=slo, users=users, out=out_dir, spawn_rate=spawn_rate,
                  rate=rate, baseline=baseline, progress=printer(out), repository=serve_repository or repository)
    with endpoint(spec, url, serve_repository, metrics_url, out) as (grpc_url, metrics):
        verdict = run_loadtest(spec, grpc_url, metrics_url=metrics, **kwargs)
    out.write(verdict.render() + "\n")
    return 0 if verdict.passed else 1
