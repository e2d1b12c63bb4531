"""Replay ranking calls that miss their deadline against a server, and say whether it survived.

Triton 2.51 segfaults when clients cancel in-flight ensemble requests (triton-inference-server/server#7368, fixed
upstream by #7840), which is why `RankingClient` abandons a late call instead of cancelling it. The route callers
use is no longer an ensemble (`fusionrank.route.stages`); this script measures both client behaviours against it:

    python -m tests.robustness.deadline_stress --serve --rounds 60                     # abandon (the client's default)
    python -m tests.robustness.deadline_stress --serve --rounds 60 --abandon-grace 0   # cancel at the deadline

Each round sends one candidate list with a deadline drawn from 1 to 100 ms, then the same list with a long deadline,
so late calls overlap normal work as they do in production. Exit code 0 when the server still serves after every
round, 1 when it died (or stopped answering).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
from pathlib import Path

from clients import NO_RETRY, RankingClient
from clients.errors import ClientError, DeadlineExceededError, UnavailableError
from fusionrank.contract.project import model_repository_dir
from fusionrank.contract.spec import ServingProfile, load_spec
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.server.launcher import TritonServer

DEADLINES_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def stress(spec, url: str, rounds: int, abandon_grace: float, alive=lambda: True, seed: int = 0, out=sys.stdout) -> int:
    """Run `rounds` rounds against `url`; returns how many completed before the server stopped serving."""
    bench = load_benchmark(spec)
    session = int(bench.frozen_sessions(1)[0])
    ids = [int(i) for i in bench.sessions.candidates[session]]
    items = {m: [bench.item(i).payload(m) for i in ids] for m in spec.modalities.enabled}
    history = bench.sessions.history[session]
    rng = random.Random(seed)
    late = shed = 0
    with RankingClient(spec, url, retry=NO_RETRY, abandon_grace=abandon_grace) as client:
        client.wait_ready(60)
        for done in range(rounds):
            try:
                client.rank_payloads(items, history, timeout=rng.choice(DEADLINES_S))
            except DeadlineExceededError:
                late += 1
            except UnavailableError:  # refused at once: the server knew the deadline could not hold the work
                shed += 1
            try:
                client.rank_payloads(items, history, timeout=120)
            except ClientError as exc:
                out.write(f"round {done + 1}: the server stopped serving: {exc}\n")
                return done
            if not alive():
                out.write(f"round {done + 1}: the server process exited\n")
                return done
        out.write(f"{rounds} rounds, {late} calls past their deadline ({client.stats.abandoned} abandoned, "
                  f"{late - client.stats.abandoned} cancelled by gRPC), {shed} refused at once as too short for "
                  "the work; the server still serves\n")
    return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.robustness.deadline_stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=None, help="pipeline spec (default: pipeline.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC endpoint of a running server")
    where.add_argument("--serve", action="store_true", help="start the local CPU server on --repository")
    p.add_argument("--repository", default=str(model_repository_dir()), help="model repository for --serve")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--abandon-grace", type=float, default=30.0,
                   help="seconds a late call stays on the server; 0 cancels it at its deadline")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    if args.url:
        done = stress(spec, args.url, args.rounds, args.abandon_grace)
        return 0 if done == args.rounds else 1
    with TritonServer.for_spec(spec, Path(args.repository), ServingProfile.CPU,
                               log_name="tritonserver-deadline-stress") as server:
        log_file = server.log_file
        done = stress(spec, server.grpc_url, args.rounds, args.abandon_grace,
                      alive=lambda: server.process.poll() is None)
        code = None
        if done < args.rounds:
            try:
                code = server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print("tritonserver is still running but stopped serving")
    if code is not None:
        print(f"tritonserver exited with code {code}"
              f"{f' (signal {signal.Signals(-code).name})' if code < 0 else ''}; log: {log_file}")
    return 0 if done == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
