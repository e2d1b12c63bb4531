"""Capacity subcommands: `bench-memory` and `tune` (their work lives in `benchmarks/`, imported on demand: the
load driver and server stack stay off the other commands' import path)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from fusionrank.project import model_repository_dir
from fusionrank.spec import load_spec

# subcommand -> (module under benchmarks/, help)
CAPACITY_COMMANDS = {
    "bench-memory": ("benchmarks.serving_memory", "resident memory of a served CPU pipeline per process, idle and "
                                                  "under a stream of never-seen items"),
    "bench-roof": ("benchmarks.roof", "the cold route against the in-process roof (one pipeline per core), side by "
                                      "side: candidates/s and CPU ms per candidate"),
    "profile-route": ("benchmarks.route_profile", "where a candidate's time goes in the served route: py-spy samples "
                                                  "of every Python backend stub under never-seen items"),
    "tune": ("benchmarks.tune.cli", "search route/encoder instances, ONNX Runtime threads and batching for the most "
                                "capacity within the spec's SLO; writes a spec overlay and a report"),
}


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(CAPACITY_COMMANDS[args.command][0])
    repo = Path(args.repository) if args.repository else model_repository_dir()
    return module.main(args, load_spec(args.spec), repo)


def add_capacity_commands(add) -> None:
    """Register every capacity subcommand with its module's own arguments."""
    for name, (module_name, help_text) in CAPACITY_COMMANDS.items():
        parser = add(name, _run, help_text)
        importlib.import_module(module_name).add_cli_args(parser)
