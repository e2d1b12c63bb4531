"""The argument parser: one subparser per subcommand, each bound to its handler in `commands`.

Closed sets (fusions, precisions, serving profiles) are offered from the spec's enums, never retyped here. The
global options (`--project`, `--spec`, `--repository`, `--verbose`) are accepted before or after the subcommand;
every option shows its default in `--help`. `bench NAME` adds the options of that benchmark module only
(`benchmarks.<name>.add_cli_args`), so listing the benchmarks imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from benchmarks import BENCHMARKS
from fusionrank.contract.spec import FusionType, Precision, ServingProfile, choices
from fusionrank.server.doors import ENV_TLS_DIR, TLS_FILES
from fusionrank_cli import commands
from fusionrank_cli.capacity import add_capacity_commands
from loadtest.soak import add_arguments as soak_arguments
from release.upgrade_measure import UPGRADE_PROFILES

DESCRIPTION = ("fusionrank: multimodal recommendation ranker, from PyTorch to ONNX and TensorRT, served on Triton "
               "through a BLS route that caches item embeddings")
FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every subcommand takes. On a subcommand (`suppress`) an absent option leaves the value given
    before the subcommand in place, so they are accepted on either side."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--project", default=default(None),
                        help="project folder holding pipeline.yaml, model_repository/, reports/ and the cache "
                             "(None: $FUSIONRANK_HOME, else the working directory)")
    parser.add_argument("--spec", default=default(None),
                        help="pipeline spec (None: the project's pipeline.yaml, else the packaged default spec)")
    parser.add_argument("--repository", default=default(None),
                        help="Triton model repository (None: the project's model_repository/)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug logging")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    return common


def _add_model_commands(add) -> None:
    add("generate-data", commands.generate_data, "generate (or reuse) the benchmark catalogue and interactions")

    p = add("train", commands.train, "train the fusion ranker on frozen-encoder embeddings")
    p.add_argument("--fusion", choices=choices(FusionType), help="fusion type (None: the spec's ranker.fusion)")
    p.add_argument("--modalities", help="comma-separated subset, e.g. 'text' for a single-modality baseline")

    p = add("evaluate", commands.evaluate,
            "evaluate every fusion type and single-modality baselines against the oracle")
    p.add_argument("--fusions", help="comma-separated fusion types (default: all six)")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--no-gate", action="store_true", help="exit 0 even if a fused model loses to a baseline")

    p = add("export", commands.export, "export encoders and ranker to ONNX and prove parity with PyTorch")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: the trained one for the spec's fusion)")
    p.add_argument("--models", help="comma-separated subset of text_encoder,image_encoder,audio_encoder,fusion_ranker")


def _add_serving_commands(add) -> None:
    p = add("render", commands.render, "write model_repository/ configs and Python models from the spec")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed repository differs from the spec")

    p = add("serve", commands.serve, "start a local Triton server on the model repository")
    p.add_argument("--profile", choices=choices(ServingProfile), default=ServingProfile.CPU.value,
                   help="cpu: ONNX Runtime in Python models; gpu: TensorRT plans; onnx_gpu: Triton's onnxruntime "
                        "backend on the GPU")
    p.add_argument("--grpc-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--http-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--metrics-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--log-file", default=None, help="Triton log file (default: in the cache folder)")
    p.add_argument("--force", action="store_true", help="gpu profile: start despite engine pre-flight mismatches")
    p.add_argument("--with-reference-ensemble", action="store_true",
                   help="also load the plain Triton ensemble (serving.reference_ensemble) for comparisons; Triton "
                        "2.51 crashes when callers cancel requests to it")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="load exactly this model (repeatable) instead of the spec's route and its members")
    p.add_argument("--print-triton-args", action="store_true",
                   help="print the tritonserver flags for the spec's models, the restricted APIs and TLS, one per "
                        "line, and exit (the image's entrypoint uses them)")
    p.add_argument("--grpc-tls-dir", default=os.environ.get(ENV_TLS_DIR) or None,
                   help=f"folder with {TLS_FILES[0]} and {TLS_FILES[1]} (and {TLS_FILES[2]}: mutual TLS): serve gRPC "
                        f"over TLS when they are there (default: ${ENV_TLS_DIR})")
    p.add_argument("--grpc-tls-cert", default=None, help="PEM certificate: serve gRPC over TLS (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", default=None, help="PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-client-ca", default=None,
                   help="PEM CA certificate: mutual TLS, callers must present a certificate it signed")

    p = add("local-cache", commands.local_cache,
            "start the spec's server-wide embedding cache (a redis-server on a Unix socket, serving.cache), then "
            "become COMMAND with $FUSIONRANK_LOCAL_CACHE naming it; the cache stops when COMMAND's process ends (the "
            "image's entrypoint runs tritonserver so)")
    p.add_argument("--wait-s", type=float, default=10.0, help="how long redis-server may take to answer PING")
    p.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]", help="what to run")

    p = add("rank", commands.rank, "rank candidates over gRPC and print a table")
    p.add_argument("--url", default="localhost:8001", help="gRPC endpoint(s), comma-separated")
    p.add_argument("--candidates", type=int, default=10, help="candidates from the benchmark catalogue")
    p.add_argument("--user", type=int, default=0, help="benchmark user whose history is sent")
    p.add_argument("--items", nargs="*", help="JSON file(s) describing candidates (text, image, audio paths)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")



def _add_load_commands(add) -> None:
    p = add("loadtest", commands.loadtest, "run a Locust load test and gate on the SLOs")
    p.add_argument("--url", default=None, help="gRPC endpoint to load (default: with --serve, the local server)")
    p.add_argument("--serve", action="store_true", help="start the local server (CPU profile) for the run")
    p.add_argument("--metrics-url", default=None,
                   help="Triton metrics URL for the server-side breakdown (default: $FUSIONRANK_METRICS_URL, or port "
                        "8002 beside a gRPC endpoint on 8001)")
    p.add_argument("--scenario", default=None, help="scenario name (default, ci, heavy) or a YAML file")
    p.add_argument("--slo", default=None, help="SLO YAML overriding the spec's slo: section")
    p.add_argument("--users", type=int, default=None, help="concurrent Locust users (None: the scenario's)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (None: the scenario's)")
    p.add_argument("--run-time", default=None, help="e.g. 30s, 2m")
    p.add_argument("--out", default=None, help="report folder (default: reports/loadtest-<time>)")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals per second over all users (the users bound the requests in "
                        "flight); default: the scenario's pacing")
    p.add_argument("--baseline", default=None,
                   help="a previous run's report folder: compare latency by a significance test with a noise floor")
    p.add_argument("--find-capacity", action="store_true",
                   help="step the open-loop rate through --capacity-rates and report the highest that meets every "
                        "SLO, beside the closed-loop saturation rate (capacity.md, capacity.png)")
    p.add_argument("--capacity-rates", default="1,2,3,4,5,6,8",
                   help="with --find-capacity: ascending arrival rates, one step each (default 1,2,3,4,5,6,8)")
    p.add_argument("--step-time", default="20s", help="with --find-capacity: length of each rate step")

    p = add("soak", commands.soak, "steady load for some minutes; fail when a Triton process's memory grows")
    soak_arguments(p)

    p = add("embed-catalogue", commands.embed_catalogue,
            "pre-compute item embeddings through the served encoders into the route's shared cache tier (Redis)")
    p.add_argument("--url", default="localhost:8001", help="gRPC endpoint of a server with the encoders loaded")
    p.add_argument("--redis", default=None, help="the shared tier, redis://host:port/db (default: serving.cache."
                                                 "redis_url of the spec)")
    p.add_argument("--profile", choices=choices(ServingProfile), default=ServingProfile.CPU.value,
                   help="the profile the server runs (its encoders' files are part of the cache keys)")
    p.add_argument("--items", nargs="*", help="candidates JSON file(s) as for `rank --items` (default: the "
                                              "benchmark catalogue)")



def _add_engine_commands(add) -> None:
    p = add("build-engines", commands.build_engines, "build TensorRT engines from the exported ONNX models (GPU)")
    p.add_argument("--precision", choices=choices(Precision), default=None,
                   help="engine precision (None: the spec's)")
    p.add_argument("--models", help="comma-separated subset of the encoders and the ranker")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file to reuse and update")

    p = add("check", commands.check, "pre-flight: do the engines in the repository match this node and the ONNX files? "
                                     "(--profile cpu: which files the CPU profile serves, and their digests)")
    p.add_argument("--profile", choices=[ServingProfile.GPU.value, ServingProfile.CPU.value],
                   default=ServingProfile.GPU.value, help="gpu: TensorRT engines (default); cpu: the served ONNX files")
    p.add_argument("--tensorrt-version", default=None, help="TensorRT version of the serving image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--backend-config", action="append", default=None,
                   help="a --backend-config value Triton will run with (repeatable; default: as fusionrank starts it)")
    p.add_argument("--print-backend-config", action="store_true",
                   help="print only the --backend-config values these engines need, one per line")

    p = add("upgrade-report", commands.upgrade_report, "rebuild, check parity and latency against a stored baseline")
    p.add_argument("--baseline", default=None, help="baseline JSON from the previous node")
    p.add_argument("--profile", choices=[p.value for p in UPGRADE_PROFILES], default=ServingProfile.CPU.value,
                   help="cpu: ONNX Runtime; gpu: TensorRT engines")
    p.add_argument("--out", default=None, help="report folder (None: reports/upgrade-<profile>-<time>)")
    p.add_argument("--save-baseline", default=None, help="write this run as a baseline JSON here")
    p.add_argument("--requests", type=int, default=None,
                   help="ensemble requests over all rounds (default 100; 0: per-model latency only)")
    p.add_argument("--url", default=None, help="measure the ensemble on this running server instead of starting one")
    p.add_argument("--rounds", type=int, default=8,
                   help="interleaved rounds: repeats per measurement for the significance test (>= 4)")
    p.add_argument("--window-s", type=float, default=0.2, help="seconds per model window in each round")
    p.add_argument("--batch-sizes", default=None, help="per-model batch sizes, e.g. 1,16 (default: the spec's)")
    p.add_argument("--baseline-repository", default=None,
                   help="the model repository served before: its files are timed in the same interleaved rounds as "
                        "these, so per-model latency is compared side by side (robust to the node's changing load)")
    p.add_argument("--inject-slowdown", action="append", metavar="MODEL=FRACTION",
                   help="make MODEL slower by FRACTION of each call's time (a sleep), to prove the gate fails on "
                        "a real slowdown, e.g. text_encoder=0.3; repeatable")

    p = add("gpu-check", commands.gpu_check, "every GPU step this node allows (the rest skipped with the reason), "
                                             "in one run that ends by itself; results in OUT/<date>-<gpu>/")
    p.add_argument("--out", default="docs/gpu", help="where the dated result folder is written")
    p.add_argument("--budget-s", type=float, default=540.0, help="time budget of the whole run (seconds)")
    p.add_argument("--requests", type=int, default=200, help="requests of the serving load test")
    p.add_argument("--users", type=int, default=8, help="concurrent clients of the serving load test")

    p = add("demo", commands.demo, "train, export, prove parity, serve, rank one request and run a short load test")
    p.add_argument("--skip-loadtest", action="store_true", help="stop after ranking one request")

    p = add("deploy-render", commands.deploy_render,
            "write the generated deployment files of the project's deploy/ (PrometheusRule, rendered overlays)")
    p.add_argument("--check", action="store_true", help="exit 1 if a generated file differs")
    p.add_argument("--no-kustomize", action="store_true", help="only the PrometheusRule (no kubectl)")


def _add_bench_commands(add, common: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    names = ", ".join(BENCHMARKS)
    p = add("bench", commands.bench, f"run one benchmark ({names}); `fusionrank bench NAME --help` for its options")
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    wanted = _bench_name(argv)
    for name, help_text in BENCHMARKS.items():
        b = sub.add_parser(name, parents=[common], help=help_text, description=help_text, formatter_class=FORMATTER)
        if name == wanted:  # only the benchmark asked for is imported
            importlib.import_module(f"benchmarks.{name}").add_cli_args(b)


def _bench_name(argv: Sequence[str]) -> str | None:
    """The benchmark named after `bench` in `argv`, if any."""
    args = list(argv)
    if "bench" not in args:
        return None
    rest = [a for a in args[args.index("bench") + 1:] if not a.startswith("-")]
    return rest[0] if rest else None


def _version() -> str:
    try:
        return metadata.version("fusionrank")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `fusionrank` parser with every subcommand (`argv` names the benchmark whose options `bench` needs)."""
    common = _common()
    parser = argparse.ArgumentParser(prog="fusionrank", description=DESCRIPTION, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"fusionrank {_version()}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text, formatter_class=FORMATTER)
        p.set_defaults(handler=handler)
        return p

    _add_model_commands(add)
    _add_serving_commands(add)
    _add_load_commands(add)
    _add_engine_commands(add)
    _add_bench_commands(add, common, argv if argv is not None else sys.argv[1:])
    add_capacity_commands(add)
    return parser
