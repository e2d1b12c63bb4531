"""What the Locust file needs besides its user: the custom command-line arguments, the pacing of the users, the
SLO gate from Locust's own statistics and the progress line.

- Arguments: `events.init_command_line_parser` adds them, so they show in `locust --help` ("Custom arguments") and
  the master sends them to its workers with every spawn message. Each takes its default from the environment
  variable named in its help (the `FUSIONRANK_*` variables of earlier releases keep working).
- Pacing (no lockstep): `--rate R` (or a scenario with `pacing.mode: target_rps`) is an open loop: one Poisson
  arrival schedule per Locust process at R / workers, shared by its users (`benchmarks.lib.PoissonPacer`); a free
  user takes the next arrival and waits for it, so the users are a bounded pool of outstanding requests, and an
  arrival that found every user busy is sent late and counted. A closed loop with think time t waits
  uniform(0.5 t, 1.5 t) after each response and a random part of t before the first request.
- Gate: in the `quitting` listener of the master (or of a single process), from Locust's aggregated statistics;
  sets `environment.process_exit_code` to 1 when an SLO is missed or a percentile has too few samples, so
  `locust --master ...` gates a distributed run. `fusionrank loadtest` turns it off (`--slo-gate off`) and gates
  from the exact per-request samples instead.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time
from dataclasses import dataclass, field

from benchmarks.lib import PoissonPacer

log = logging.getLogger("fusionrank.loadtest")

ENV_URL = "FUSIONRANK_LOADTEST_URL"
ENV_SPEC = "FUSIONRANK_SPEC"
ENV_SCENARIO = "FUSIONRANK_SCENARIO"
ENV_RATE = "FUSIONRANK_LOADTEST_RATE"
ENV_SLO = "FUSIONRANK_LOADTEST_SLO"
ENV_GATE = "FUSIONRANK_LOADTEST_SLO_GATE"
ENV_SAMPLES = "FUSIONRANK_LOADTEST_SAMPLES"
ENV_SEED = "FUSIONRANK_LOADTEST_SEED"
ENV_ATTEMPTS = "FUSIONRANK_LOADTEST_ATTEMPTS"
ENV_DONE = "FUSIONRANK_LOADTEST_DONE"
ENV_PROGRESS = "FUSIONRANK_LOADTEST_PROGRESS_S"
CONNECT_TIMEOUT_S = 2.0  # a refused or unreachable endpoint fails the run within this


def add_arguments(parser) -> None:
    """fusionrank's custom Locust arguments (listener of `events.init_command_line_parser`)."""
    parser.add_argument("--endpoints", default="", env_var=ENV_URL,
                       help=f"gRPC endpoint(s) host:port, comma-separated (default: --host) [${ENV_URL}]")
    parser.add_argument("--spec", default="", env_var=ENV_SPEC,
                       help=f"pipeline spec YAML (default: the project's, else the packaged one) [${ENV_SPEC}]")
    parser.add_argument("--scenario", default="", env_var=ENV_SCENARIO,
                       help=f"scenario name (default, ci, heavy) or YAML [${ENV_SCENARIO}]")
    parser.add_argument("--rate", type=float, default=0.0, env_var=ENV_RATE,
                       help="open loop: Poisson arrivals per second over all users and workers; users bound the "
                            f"requests in flight (0: the scenario's pacing) [${ENV_RATE}]")
    parser.add_argument("--slo", default="", env_var=ENV_SLO,
                       help=f"SLO YAML over the spec's slo: section, for the gate [${ENV_SLO}]")
    parser.add_argument("--slo-gate", choices=["on", "off"], default="on", env_var=ENV_GATE,
                       help="gate the run on the SLOs when Locust quits (exit code 1 on a miss or too few samples "
                            f"for a gated percentile) [${ENV_GATE}]")
    parser.add_argument("--samples-dir", default="", env_var=ENV_SAMPLES,
                       help=f"folder for per-request samples, one CSV per process (default: none) [${ENV_SAMPLES}]")
    parser.add_argument("--seed", type=int, default=0, env_var=ENV_SEED,
                       help="base seed of the request streams: user k of worker w draws from seed + 100000 w + k "
                            f"[${ENV_SEED}]")
    parser.add_argument("--attempts", type=int, default=1, env_var=ENV_ATTEMPTS,
                       help="attempts per request (1: what a caller sees on its first attempt; more: each user's "
                            f"client retries and fails over) [${ENV_ATTEMPTS}]")
    parser.add_argument("--done-file", default="", env_var=ENV_DONE, include_in_web_ui=False,
                       help=f"a file touched when Locust has written its results [${ENV_DONE}]")
    parser.add_argument("--progress-s", type=float, default=5.0, env_var=ENV_PROGRESS,
                       help=f"seconds between progress lines (0: none) [${ENV_PROGRESS}]")


@dataclass
class Pacing:
    """How one Locust process's users space their requests (see the module doc)."""

    rate: float = 0.0  # open loop: arrivals per second of this process (0: closed loop)
    think_time_s: float = 0.0
    seed: int = 0
    pacer: PoissonPacer | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.rate < 0 or math.isnan(self.rate):
            raise ValueError(f"--rate {self.rate}: must be >= 0 requests per second")
        if self.rate > 0:
            self.pacer = PoissonPacer(self.rate, seed=self.seed)
        self._rng = random.Random(self.seed)

    @property
    def open_loop(self) -> bool:
        return self.pacer is not None

    def set_rate(self, rate: float) -> None:
        """Change the open loop's rate from now on (a capacity search's next step)."""
        if self.pacer is None:
            self.pacer = PoissonPacer(rate, seed=self.seed)
        self.pacer.rate = self.rate = rate

    def first_wait(self) -> float:
        """Before a user's first request: its arrival (open loop), or a random part of the think time."""
        return self.pacer.delay() if self.pacer else self._rng.uniform(0.0, self.think_time_s)

    def wait(self) -> float:
        """After a response: until the next arrival (open loop), or the think time with +-50 % jitter."""
        if self.pacer:
            return self.pacer.delay()
        return self._rng.uniform(0.5, 1.5) * self.think_time_s if self.think_time_s else 0.0

    def counters(self) -> dict:
        if not self.pacer:
            return {"mode": "closed", "think_time_s": self.think_time_s}
        # arrivals due by now: each user has already drawn its next arrival, which a stopped run never sends
        return {"mode": "open", "rate": self.rate, "arrivals": self.pacer.due(), "late": self.pacer.late}


def pacing_for(options, scenario, workers: int, worker_index: int) -> Pacing:
    """This process's pacing: `--rate`, else the scenario's target rate, split over `workers` processes."""
    rate = options.rate or (scenario.pacing.target_rps if scenario.pacing.mode == "target_rps" else 0.0)
    seed = options.seed + 7919 * worker_index
    return Pacing(rate / max(1, workers) if rate else 0.0, scenario.pacing.think_time_s, seed)


def probe(endpoint: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when `host:port` accepts a TCP connection within `timeout_s`, else why not."""
    host, _, port = endpoint.strip().rpartition(":")
    if not host or not port.isdigit():
        return None  # a gRPC target we cannot probe (e.g. a resolver scheme): gRPC will say
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{endpoint}: {exc.strerror or exc} (is the server running and listening there?)"


def summary_from_stats(total, users: int | None = None, started: float | None = None) -> dict:
    """The load test's summary figures from Locust's aggregated `StatsEntry` (percentiles rounded by Locust)."""
    ok = total.num_requests - total.num_failures
    end = total.last_request_timestamp or time.time()
    duration = max(0.0, end - (started or total.start_time))
    pct = {f"p{q}_ms": float(total.get_response_time_percentile(q / 100)) if ok else math.nan for q in (50, 95, 99)}
    return {"requests": total.num_requests, "failures": total.num_failures, "latency_samples": ok,
            "error_rate": total.num_failures / total.num_requests if total.num_requests else 1.0,
            "duration_s": duration, "throughput_rps": ok / duration if duration > 0 else 0.0, "users": users,
            **pct, "source": "locust-stats"}


def progress_line(total, elapsed_s: float, users: int, target_rate: float | None) -> str:
    """`progress 15s: 60 requests (4.0/s of 4.0/s), p50 42 ms, p99 95 ms, 0 errors (0.0%), 2 users`."""
    rate = total.num_requests / elapsed_s if elapsed_s > 0 else 0.0
    target = f" of {target_rate:g}/s" if target_rate else ""
    if total.num_requests - total.num_failures:
        lat = (f"p50 {total.get_response_time_percentile(0.5):.0f} ms, "
               f"p99 {total.get_response_time_percentile(0.99):.0f} ms")
    else:
        lat = "no response yet"
    ratio = total.num_failures / total.num_requests if total.num_requests else 0.0
    return (f"progress {elapsed_s:.0f}s: {total.num_requests} requests ({rate:.1f}/s{target}), {lat}, "
            f"{total.num_failures} errors ({ratio:.1%}), {users} users")


def locust_help() -> str:
    """Locust's `--help` with these arguments in it. Locust 2.x prints `--help` before it loads the locust file, so
    `locust -f loadtest/locustfile.py --help` lists Locust's own options only (locustio/locust#2917); this is
    `python -m loadtest.locust_setup`."""
    from locust.argument_parser import get_parser

    parser = get_parser()
    add_arguments(parser)
    return parser.format_help()


if __name__ == "__main__":
    print(locust_help())
