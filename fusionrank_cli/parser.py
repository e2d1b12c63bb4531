"""The argument parser: one subparser per subcommand, each bound to its handler in `commands`.

Closed sets (fusions, precisions, serving profiles) are offered from the spec's enums, never retyped here.
"""

from __future__ import annotations

import argparse
import os

from export.upgrade_measure import UPGRADE_PROFILES
from fusionrank.serving.doors import ENV_TLS_DIR, TLS_FILES
from fusionrank.spec import FusionType, Precision, ServingProfile, choices
from fusionrank_cli import commands
from fusionrank_cli.capacity import add_capacity_commands
from loadtest.soak import add_arguments as soak_arguments

DESCRIPTION = "fusionrank: multimodal recommendation ranker, from PyTorch to a Triton ensemble"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", default=None,
                        help="project folder holding pipeline.yaml, model_repository/, reports/ and the cache "
                             "(default: $FUSIONRANK_HOME, else the working directory)")
    common.add_argument("--spec", default=None,
                        help="pipeline spec (default: the project's pipeline.yaml, else the packaged default spec)")
    common.add_argument("--repository", default=None,
                        help="Triton model repository (default: the project's model_repository/)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return common


def _add_model_commands(add) -> None:
    add("generate-data", commands.generate_data, "generate (or reuse) the benchmark catalogue and interactions")

    p = add("train", commands.train, "train the fusion ranker on frozen-encoder embeddings")
    p.add_argument("--fusion", choices=choices(FusionType))
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
    p.add_argument("--profile", choices=choices(ServingProfile), default=ServingProfile.CPU.value)
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
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--spawn-rate", type=float, default=None)
    p.add_argument("--run-time", default=None, help="e.g. 30s, 2m")
    p.add_argument("--out", default=None, help="report folder (default: reports/loadtest-<time>)")

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

    p = add("bench", commands.bench, "in-process pipeline, plain ensemble and cached route (cold, warm) side by side "
                                     "on one Zipf candidate stream: table, bench.json, bench.png")
    p.add_argument("--candidates", type=int, default=16, help="candidates per request (N)")
    p.add_argument("--callers", type=int, default=8, help="concurrent closed-loop callers (C)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of item popularity")
    p.add_argument("--novel-share", type=float, default=0.05, help="share of never-seen candidates")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each served phase")
    p.add_argument("--inprocess-seconds", type=float, default=15.0, help="length of each in-process phase")
    p.add_argument("--no-shared-tier", action="store_true",
                   help="no local redis-server: the route's in-process cache only, warm after the cold phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--out", default=None, help="report folder (default: reports/bench-<time>)")


def _add_engine_commands(add) -> None:
    p = add("build-engines", commands.build_engines, "build TensorRT engines from the exported ONNX models (GPU)")
    p.add_argument("--precision", choices=choices(Precision), default=None)
    p.add_argument("--models", help="comma-separated subset of the encoders and the ranker")
    p.add_argument("--timing-cache", default=None)

    p = add("check", commands.check, "pre-flight: do the engines in the repository match this node and the ONNX files?")
    p.add_argument("--tensorrt-version", default=None, help="TensorRT version of the serving image")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backend-config", action="append", default=None,
                   help="a --backend-config value Triton will run with (repeatable; default: as fusionrank starts it)")
    p.add_argument("--print-backend-config", action="store_true",
                   help="print only the --backend-config values these engines need, one per line")

    p = add("upgrade-report", commands.upgrade_report, "rebuild, check parity and latency against a stored baseline")
    p.add_argument("--baseline", default=None, help="baseline JSON from the previous node")
    p.add_argument("--profile", choices=[p.value for p in UPGRADE_PROFILES], default=ServingProfile.CPU.value,
                   help="cpu: ONNX Runtime; gpu: TensorRT engines")
    p.add_argument("--out", default=None)
    p.add_argument("--save-baseline", default=None, help="write this run as a baseline JSON here")
    p.add_argument("--requests", type=int, default=None, help="benchmark requests (default from the scenario)")

    p = add("cpu-report", commands.cpu_report,
            "CPU profile: FP32 vs optimised FP32 vs INT8 per model and served end to end, with the accuracy gates")
    p.add_argument("--out", default=None, help="report folder (default reports/cpu-int8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    p.add_argument("--requests", type=int, default=30, help="served: requests per variant and round")
    p.add_argument("--users", type=int, default=4, help="served: closed-loop callers")
    p.add_argument("--batch-sizes", default="1,16,64", help="per model: batch sizes")
    p.add_argument("--threads", default=None, help="served: also the spec's choice at these intra-op threads, e.g. 2")
    p.add_argument("--scenario", default=None, help="served: load-test scenario name or file (default: default)")
    p.add_argument("--skip-served", action="store_true", help="per-model figures and accuracy only")

    p = add("demo", commands.demo, "train, export, prove parity, serve, rank one request and run a short load test")
    p.add_argument("--skip-loadtest", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The `fusionrank` parser with every subcommand."""
    common = _common()
    parser = argparse.ArgumentParser(prog="fusionrank", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    _add_model_commands(add)
    _add_serving_commands(add)
    _add_load_commands(add)
    _add_engine_commands(add)
    add_capacity_commands(add)
    return parser
