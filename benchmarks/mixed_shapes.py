"""`fusionrank bench mixed_shapes`: two calls of different shapes to one member at once (issue 23's hot path).

The route sends a request's text rows to the text encoder per padding bucket (a row's embedding must not depend on
its batch-mates' lengths), so a request with never-seen titles of two buckets makes two concurrent calls of
different shapes, and so do two requests of different buckets. Triton 2.51's dynamic batcher holds such requests
apart when the model's variable-size inputs must have equal shapes, and the second one sometimes waited for the
batcher's default wake-up, 500 ms. The CPU profile's text encoder therefore allows ragged batches (its Python class
runs each shape's rows on its own). This benchmark serves the text encoder both ways, side by side on one
repository, and sends pairs of concurrent calls of the spec's buckets: latency of each pair and how many took over
`SLOW_MS`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks._args import repository_of, spec_of
from benchmarks.lib import describe_machine
from benchmarks.lib.repository import overlay_repository
from fusionrank.contract.names import Modality, encoder_name

SLOW_MS = 200.0
PAIRS = 30


@contextlib.contextmanager
def held_apart(spec, repo: Path, model: str) -> Iterator[Path]:
    """`repo` as `spec` renders it (weights linked), where `model`'s CPU config does not allow ragged batches."""
    from google.protobuf import text_format

    from fusionrank.contract.spec import ServingProfile
    from fusionrank.triton.render import HEADER, load_config

    with overlay_repository(spec, repo) as root:
        path = root / model / ServingProfile.CPU.config_file
        config = load_config(path)
        for entry in config.input:
            entry.allow_ragged_batch = False
        path.write_text(HEADER + text_format.MessageToString(config))
        yield root


def _inputs(grpcclient, config: dict, length: int) -> list:
    """One row of ones for each of the model's inputs, its variable dimension `length` long."""
    from tritonclient.utils import triton_to_np_dtype

    from fusionrank.contract.tensors import infer_inputs

    return infer_inputs(grpcclient, {
        entry["name"]: np.ones([1, *[int(d) if int(d) > 0 else length for d in entry["dims"]]],
                               dtype=triton_to_np_dtype(entry["data_type"].removeprefix("TYPE_")))
        for entry in config["input"]})


def measure_pairs(spec, repo: Path, pairs: int) -> dict[str, np.ndarray]:
    """Milliseconds per pair of concurrent text-encoder calls, by pair of padding buckets, on a server of `repo`."""
    import tritonclient.grpc as grpcclient

    from fusionrank.contract.spec import ServingProfile
    from fusionrank.server.launcher import TritonServer

    model = encoder_name(Modality.TEXT)
    buckets = spec.modalities.text.buckets
    results = {}
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-mixed-shapes") as server, \
            ThreadPoolExecutor(2) as pool:
        clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(2)]
        try:
            config = clients[0].get_model_config(model, as_json=True)["config"]
            for pair in [(b, b) for b in buckets[:1]] + list(itertools.combinations(buckets, 2)):
                took = []
                for _ in range(pairs):
                    calls = [(client, _inputs(grpcclient, config, length)) for client, length in zip(clients, pair)]
                    started = time.perf_counter()
                    for future in [pool.submit(c.infer, model, inputs) for c, inputs in calls]:
                        future.result(timeout=60)
                    took.append(1000 * (time.perf_counter() - started))
                results[f"{pair[0]} + {pair[1]} tokens"] = np.array(took)
        finally:
            for client in clients:
                client.close()
    return results


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=PAIRS, help="pairs of concurrent calls per pair of buckets")


def main(args: argparse.Namespace) -> int:
    spec, repo = spec_of(args), repository_of(args)
    print(f"fusionrank bench mixed_shapes on {describe_machine()}")
    with held_apart(spec, repo, encoder_name(Modality.TEXT)) as apart:
        runs = {"held apart (equal shapes enforced)": measure_pairs(spec, apart, args.pairs),
                "ragged allowed (served config)": measure_pairs(spec, repo, args.pairs)}
    print(f"\n| text encoder | pair of calls | pairs | p50 ms | max ms | over {SLOW_MS:.0f} ms |")
    print("|---|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        for pair, took in results.items():
            print(f"| {name} | {pair} | {len(took)} | {np.median(took):.1f} | {took.max():.0f} | "
                  f"{int((took > SLOW_MS).sum())} |")
    return 0
