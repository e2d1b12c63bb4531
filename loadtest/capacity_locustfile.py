"""Locust file of the capacity search (`fusionrank loadtest --find-capacity`): the ranking user of
`loadtest/locustfile.py` under a `LoadTestShape` that steps the open-loop arrival rate.

Custom arguments: `--capacity-rates 2,4,6` (arrivals per second, one step each), `--capacity-step-s 20`. Each step
writes its start time and rate to `<samples-dir>/steps.json`, so the report can cut the samples per step. The rate
is set in this Locust process, so the search runs as one process (not distributed); the users (`-u`) bound the
requests in flight at every step.
"""

import json
import time
from pathlib import Path

from locust import LoadTestShape, events

from loadtest.locustfile import *  # noqa: F401,F403  (the ranking user and the listeners, gRPC made gevent-safe)
from loadtest.locustfile import _shared


@events.init_command_line_parser.add_listener
def _capacity_arguments(parser, **_kwargs):
    parser.add_argument("--capacity-rates", default="", help="open-loop rates to step through, e.g. 2,4,6,8")
    parser.add_argument("--capacity-step-s", type=float, default=20.0, help="seconds per rate step")


class StepRateShape(LoadTestShape):
    """All users from the start; the arrival rate steps through `--capacity-rates`, `--capacity-step-s` each."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self.steps: list[dict] = []

    def tick(self):
        options = self.runner.environment.parsed_options
        rates = [float(r) for r in options.capacity_rates.split(",") if r.strip()]
        step = int(self.get_run_time() // options.capacity_step_s)
        if step != self.step:
            self.step = step
            # arrivals due so far: per step, what the client should have sent (the drawn schedule, not the rate)
            pacer = _shared["pacing"].pacer if "pacing" in _shared else None
            due = pacer.due() if pacer else 0
            if self.steps:
                self.steps[-1].update(end=time.time(), due=due - self.steps[-1]["due_before"])
            if step < len(rates):
                _shared["rate"] = rates[step]
                if "pacing" in _shared:
                    _shared["pacing"].set_rate(rates[step])
                self.steps.append({"rate": rates[step], "start": time.time(), "due_before": due})
            if options.samples_dir:
                Path(options.samples_dir).mkdir(parents=True, exist_ok=True)
                (Path(options.samples_dir) / "steps.json").write_text(json.dumps(self.steps))
        if step >= len(rates):
            return None
        users = self.runner.environment.parsed_options.num_users or 1
        return users, users


__all__ = ["StepRateShape"]
