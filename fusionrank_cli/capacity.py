"""`fusionrank tune`: its work lives in `benchmarks.tune`, imported on demand (the load driver and the server
stack stay off the other commands' import path)."""

from __future__ import annotations

import argparse
import importlib

TUNE_HELP = ("search route/encoder instances, ONNX Runtime threads, queue delays and batch sizes for the most capacity "
             "within the spec's SLO; writes a spec overlay and a report")


def _tune(args: argparse.Namespace) -> int:
    return importlib.import_module("benchmarks.tune.cli").main(args)


def add_capacity_commands(add) -> None:
    """Register `tune` with its module's own arguments."""
    importlib.import_module("benchmarks.tune.cli").add_cli_args(add("tune", _tune, TUNE_HELP))
