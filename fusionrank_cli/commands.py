"""Subcommand handlers: each translates its parsed arguments into typed arguments of one library function.

Modules that pull in torch (training, evaluation, ONNX export, the demo) are imported inside their handler, so
`fusionrank --help` and the serving commands start without it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NoReturn

from clients.tls import ClientTls
from export.convert.onnx2trt import build_engines_command
from export.verify.preflight import check_command, refuse_on_mismatch, triton_backend_config
from export.verify.served_files import check_cpu_command
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import model_repository_dir, project_dir
from fusionrank.contract.spec import FusionType, Modality, PipelineSpec, Precision, ServingProfile, load_spec
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import parse_duration
from fusionrank.route.warming import benchmark_items
from fusionrank.route.warming import embed_catalogue as embed_items
from fusionrank.server.doors import GrpcTls
from fusionrank.server.local_cache import exec_with_local_cache
from fusionrank.server.serve_command import print_triton_args, serve_forever
from fusionrank.triton.render import check_repository, render_repository
from fusionrank_cli.rank_command import file_request, run_rank
from loadtest.capacity import CapacityPlan, run_capacity_command
from loadtest.runner import run_loadtest_command
from loadtest.soak import run_soak_command
from release.upgrade import parse_slowdown, upgrade_report_command
from release.upgrade_timing import TimingPlan


def _spec(args: argparse.Namespace) -> PipelineSpec:
    return load_spec(args.spec)


def _repo(args: argparse.Namespace) -> Path:
    return Path(args.repository) if args.repository else model_repository_dir()


def _csv(value: str | None) -> list[str] | None:
    return value.split(",") if value else None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def generate_data(args) -> int:
    print(load_benchmark(_spec(args)).summary())
    return 0


def train(args) -> int:
    from fusionrank.model.train import train_ranker  # torch

    modalities = tuple(Modality(m) for m in _csv(args.modalities)) if args.modalities else None
    path = train_ranker(_spec(args), fusion=FusionType(args.fusion) if args.fusion else None, modalities=modalities)
    print(f"checkpoint: {path}")
    return 0


def evaluate(args) -> int:
    from fusionrank.model.evaluate import evaluate_all  # torch

    report = evaluate_all(_spec(args), fusions=_csv(args.fusions))
    print(report.table())
    if args.json:
        report.write_json(Path(args.json))
        print(f"wrote {args.json}")
    return 0 if report.fused_beats_baselines() or args.no_gate else 1


def export(args) -> int:
    from export.convert.torch2onnx import export_all  # torch

    report = export_all(_spec(args), _repo(args), checkpoint=_path(args.checkpoint), models=_csv(args.models))
    print(report.table())
    return 0


def render(args) -> int:
    spec, repo = _spec(args), _repo(args)
    if args.check:
        diffs = check_repository(spec, repo)
        for d in diffs:
            print(d)
        return 1 if diffs else 0
    for path in render_repository(spec, repo):
        print(f"wrote {path}")
    return 0


def _grpc_tls(args: argparse.Namespace) -> GrpcTls | None:
    if not (args.grpc_tls_cert or args.grpc_tls_key or args.grpc_tls_client_ca):
        return GrpcTls.from_dir(args.grpc_tls_dir) if args.grpc_tls_dir else None
    if not (args.grpc_tls_cert and args.grpc_tls_key):
        raise SystemExit("fusionrank serve: TLS needs both --grpc-tls-cert and --grpc-tls-key")
    return GrpcTls(Path(args.grpc_tls_cert), Path(args.grpc_tls_key),
                   Path(args.grpc_tls_client_ca) if args.grpc_tls_client_ca else None)


def serve(args) -> int:
    spec, repo, profile = _spec(args), _repo(args), ServingProfile(args.profile)
    tls = _grpc_tls(args)
    if args.print_triton_args:
        return print_triton_args(spec, reference_ensemble=args.with_reference_ensemble, tls=tls)
    backend_config = []
    if profile is ServingProfile.GPU:
        backend_config = triton_backend_config(spec, repo)
        refuse_on_mismatch(spec, repo, force=args.force, backend_config=backend_config)
    return serve_forever(spec, repo, profile, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, log_file=args.log_file, backend_config=backend_config,
                         reference_ensemble=args.with_reference_ensemble, models=args.model, tls=tls)


def local_cache(args) -> NoReturn:
    # Some Python versions keep the `--` before a REMAINDER argument, others drop it.
    command = args.run[1:] if args.run[:1] == ["--"] else args.run
    exec_with_local_cache(_spec(args).serving.cache.server_tier_bytes, command, timeout=args.wait_s)


def rank(args) -> int:
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTls(*(Path(p) if p else None for p in (args.tls_ca, args.tls_key, args.tls_cert)))
    return run_rank(_spec(args), args.url, items=args.items, user=args.user, candidates=args.candidates,
                    as_json=args.json, tls=tls)


def loadtest(args) -> int:
    serve = _repo(args) if args.serve else None
    if args.find_capacity:
        try:
            rates = tuple(float(r) for r in _csv(args.capacity_rates))
        except ValueError:
            raise FusionRankError(f"--capacity-rates {args.capacity_rates!r}: expected numbers separated by commas, "
                                  "e.g. 2,4,6") from None
        plan = CapacityPlan(rates, parse_duration(args.step_time), args.users or 16)
        return run_capacity_command(_spec(args), plan, url=args.url, serve_repository=serve, scenario=args.scenario,
                                    slo=args.slo, out_dir=_path(args.out))
    return run_loadtest_command(_spec(args), url=args.url, serve_repository=serve,
                                metrics_url=args.metrics_url, run_time=args.run_time, scenario=args.scenario,
                                slo=args.slo, users=args.users, spawn_rate=args.spawn_rate, out_dir=_path(args.out),
                                rate=args.rate, baseline=_path(args.baseline),
                                repository=Path(args.repository) if args.repository else None)


def soak(args) -> int:
    return run_soak_command(_spec(args), args.minutes, url=args.url, pid=args.pid,
                            serve_repository=_repo(args) if args.serve else None, users=args.users,
                            scenario=args.scenario, max_growth_mb=args.max_growth_mb)


def embed_catalogue(args) -> int:
    spec = _spec(args)
    # The items of candidates JSON files (the format of `fusionrank rank --items`), else the whole benchmark catalogue.
    items = file_request(args.items).candidates if args.items else benchmark_items(load_benchmark(spec))
    report = embed_items(spec, _repo(args), args.url, args.redis, ServingProfile(args.profile), items=items)
    print(report.summary())
    return 1 if report.refused else 0


def bench(args) -> int:
    """`fusionrank bench NAME`: the benchmark module's own `main` (imported only now: its libraries are heavy)."""
    return int(importlib.import_module(f"benchmarks.{args.benchmark}").main(args) or 0)


def build_engines(args) -> int:
    return build_engines_command(_spec(args), _repo(args), precision=Precision(args.precision) if args.precision
                                 else None, models=_csv(args.models), timing_cache=_path(args.timing_cache))


def check(args) -> int:
    if args.profile == ServingProfile.CPU.value:
        return check_cpu_command(_spec(args), _repo(args), as_json=args.json)
    return check_command(_spec(args), _repo(args), tensorrt_version=args.tensorrt_version, as_json=args.json,
                         backend_config=args.backend_config, print_backend_config=args.print_backend_config)


def upgrade_report(args) -> int:
    plan = TimingPlan(rounds=args.rounds, window_s=args.window_s)
    try:
        sizes = tuple(int(b) for b in _csv(args.batch_sizes)) if args.batch_sizes else None
    except ValueError:
        raise FusionRankError(f"--batch-sizes {args.batch_sizes!r}: expected integers separated by commas, "
                              "e.g. 1,16") from None
    return upgrade_report_command(_spec(args), _repo(args), ServingProfile(args.profile), baseline=_path(args.baseline),
                                  out_dir=_path(args.out), save_baseline=_path(args.save_baseline),
                                  requests=args.requests, url=args.url, plan=plan, batch_sizes=sizes,
                                  slowdown=parse_slowdown(args.inject_slowdown),
                                  baseline_repository=_path(args.baseline_repository))


def gpu_check(args) -> int:
    from release.gpu_check import FAILED, run_gpu_check  # torch and TensorRT, where the node has them

    folder, report = run_gpu_check(_spec(args), _repo(args), Path(args.out), args.budget_s, args.requests, args.users)
    for step in report["steps"]:
        print(f"{step['name']:<24} {step['status']:<8} {step['reason']}")
    print(f"wrote {folder / 'gpu-check.md'} and {folder / 'gpu-check.json'}")
    return 1 if any(s["status"] == FAILED for s in report["steps"]) else 0


def deploy_render(args) -> int:
    from fusionrank_cli.deploy_render import render_deploy

    deploy = project_dir() / "deploy"
    stale = render_deploy(deploy, check=args.check, kustomize_overlays=not args.no_kustomize)
    for path in stale:
        print(f"{path.relative_to(deploy.parent)} differs from its rendering: run `make deploy-render`",
              file=sys.stderr)
    return 1 if stale else 0


def demo(args) -> int:
    from fusionrank_cli.demo import run_demo  # torch

    return run_demo(_spec(args), _repo(args), skip_loadtest=args.skip_loadtest)
