"""`fusionrank` console script: each subcommand translates arguments and calls one library function.

Implementations are imported inside the handlers so `fusionrank --help` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fusionrank.errors import FusionRankError

log = logging.getLogger("fusionrank")


def _spec(args):
    from fusionrank.spec import load_spec

    return load_spec(args.spec)


def _repo(args) -> Path:
    from fusionrank.paths import MODEL_REPOSITORY

    return Path(args.repository) if args.repository else MODEL_REPOSITORY


# --- handlers ---------------------------------------------------------------------------------------------------


def cmd_generate_data(args) -> int:
    from fusionrank.benchmark import load_benchmark

    bench = load_benchmark(_spec(args))
    print(bench.summary())
    return 0


def cmd_train(args) -> int:
    from fusionrank.spec import FusionType, Modality
    from fusionrank.train import train_ranker

    fusion = FusionType(args.fusion) if args.fusion else None
    modalities = tuple(Modality(m) for m in args.modalities.split(",")) if args.modalities else None
    path = train_ranker(_spec(args), fusion=fusion, modalities=modalities)
    print(f"checkpoint: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from fusionrank.evaluate import evaluate_all

    report = evaluate_all(_spec(args), fusions=args.fusions.split(",") if args.fusions else None)
    print(report.table())
    if args.json:
        report.write_json(Path(args.json))
        print(f"wrote {args.json}")
    return 0 if report.fused_beats_baselines() or args.no_gate else 1


def cmd_export(args) -> int:
    from export.torch2onnx import export_all

    report = export_all(_spec(args), _repo(args), checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                        models=args.models.split(",") if args.models else None)
    print(report.table())
    return 0


def cmd_render(args) -> int:
    from fusionrank.serving.render import check_repository, render_repository

    spec, repo = _spec(args), _repo(args)
    if args.check:
        diffs = check_repository(spec, repo)
        for d in diffs:
            print(d)
        return 1 if diffs else 0
    for path in render_repository(spec, repo):
        print(f"wrote {path}")
    return 0


def cmd_serve(args) -> int:
    from fusionrank.serving.server import serve_forever

    return serve_forever(_spec(args), _repo(args), profile=args.profile, grpc_port=args.grpc_port,
                         http_port=args.http_port, metrics_port=args.metrics_port, log_file=args.log_file,
                         force=args.force)


def cmd_rank(args) -> int:
    from clients.rank_command import run_rank

    return run_rank(_spec(args), args)


def cmd_loadtest(args) -> int:
    from loadtest.runner import run_loadtest_command

    return run_loadtest_command(_spec(args), args)


def cmd_build_engines(args) -> int:
    from export.onnx2trt import build_engines_command

    return build_engines_command(_spec(args), _repo(args), args)


def cmd_check(args) -> int:
    from export.preflight import check_command

    return check_command(_spec(args), _repo(args), args)


def cmd_upgrade_report(args) -> int:
    from export.upgrade import upgrade_report_command

    return upgrade_report_command(_spec(args), _repo(args), args)


def cmd_demo(args) -> int:
    from fusionrank.demo import run_demo

    return run_demo(_spec(args), _repo(args), args)


# --- parser -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spec", default=None, help="pipeline spec (default: pipeline.yaml of this repository)")
    common.add_argument("--repository", default=None, help="Triton model repository (default: ./model_repository)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="fusionrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    add("generate-data", cmd_generate_data, "generate (or reuse) the benchmark catalogue and interactions")

    p = add("train", cmd_train, "train the fusion ranker on frozen-encoder embeddings")
    p.add_argument("--fusion", choices=["concat", "weighted", "attention", "gated", "late", "two_tower"])
    p.add_argument("--modalities", help="comma-separated subset, e.g. 'text' for a single-modality baseline")

    p = add("evaluate", cmd_evaluate, "evaluate every fusion type and single-modality baselines against the oracle")
    p.add_argument("--fusions", help="comma-separated fusion types (default: all six)")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--no-gate", action="store_true", help="exit 0 even if a fused model loses to a baseline")

    p = add("export", cmd_export, "export encoders and ranker to ONNX and prove parity with PyTorch")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: the trained one for the spec's fusion)")
    p.add_argument("--models", help="comma-separated subset of text_encoder,image_encoder,audio_encoder,fusion_ranker")

    p = add("render", cmd_render, "write model_repository/ configs and Python models from the spec")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed repository differs from the spec")

    p = add("serve", cmd_serve, "start a local Triton server on the model repository")
    p.add_argument("--profile", choices=["cpu", "gpu", "onnx_gpu"], default="cpu")
    p.add_argument("--grpc-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--http-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--metrics-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--log-file", default=None, help="Triton log file (default: in the cache folder)")
    p.add_argument("--force", action="store_true", help="gpu profile: start despite engine pre-flight mismatches")

    p = add("rank", cmd_rank, "rank candidates over gRPC and print a table")
    p.add_argument("--url", default="localhost:8001", help="gRPC endpoint(s), comma-separated")
    p.add_argument("--candidates", type=int, default=10, help="candidates from the benchmark catalogue")
    p.add_argument("--user", type=int, default=0, help="benchmark user whose history is sent")
    p.add_argument("--items", nargs="*", help="JSON file(s) describing candidates (text, image, audio paths)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = add("loadtest", cmd_loadtest, "run a Locust load test and gate on the SLOs")
    p.add_argument("--url", default=None, help="gRPC endpoint to load (default: with --serve, the local server)")
    p.add_argument("--serve", action="store_true", help="start the local server (CPU profile) for the run")
    p.add_argument("--metrics-url", default=None,
                   help="Triton metrics URL for the server-side breakdown (default: $FUSIONRANK_METRICS_URL, or port "
                        "8002 beside a gRPC endpoint on 8001)")
    p.add_argument("--scenario", default=None, help="scenario YAML (default: loadtest/scenarios/default.yaml)")
    p.add_argument("--slo", default=None, help="SLO YAML (default: loadtest/slo.yaml)")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--spawn-rate", type=float, default=None)
    p.add_argument("--run-time", default=None, help="e.g. 30s, 2m")
    p.add_argument("--out", default=None, help="report folder (default: reports/loadtest-<time>)")

    p = add("build-engines", cmd_build_engines, "build TensorRT engines from the exported ONNX models (GPU)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None)
    p.add_argument("--models", help="comma-separated subset of the encoders and the ranker")
    p.add_argument("--timing-cache", default=None)

    p = add("check", cmd_check, "pre-flight: do the engines in the repository match this node and the ONNX files?")
    p.add_argument("--tensorrt-version", default=None, help="TensorRT version of the serving image")
    p.add_argument("--json", action="store_true")

    p = add("upgrade-report", cmd_upgrade_report, "rebuild, check parity and latency against a stored baseline")
    p.add_argument("--baseline", default=None, help="baseline JSON from the previous node")
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--save-baseline", default=None, help="write this run as a baseline JSON here")
    p.add_argument("--requests", type=int, default=None, help="benchmark requests (default from the scenario)")

    p = add("demo", cmd_demo, "train, export, prove parity, serve, rank one request and run a short load test")
    p.add_argument("--skip-loadtest", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args) or 0)
    except FusionRankError as exc:
        print(f"fusionrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
