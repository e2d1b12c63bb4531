"""`fusionrank serve`: a local Triton that runs until Ctrl-C or SIGTERM, reports its own death, and locks its doors
(restricted APIs with the admin key from $FUSIONRANK_ADMIN_KEY, optional TLS for gRPC)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fusionrank.contract.spec import PipelineSpec, ServingProfile, served_models
from fusionrank.server.doors import ENV_ADMIN_KEY, RESTRICTED_APIS, GrpcTls, admin_key_from_env, new_admin_key
from fusionrank.server.launcher import TritonServer, describe_exit, exit_status_for, policy_args


def serve_forever(spec: PipelineSpec, repo: Path, profile: ServingProfile = ServingProfile.CPU, grpc_port: int = 0,
                  http_port: int = 0, metrics_port: int = 0, log_file: str | None = None,
                  reference_ensemble: bool = False, models: Sequence[str] | None = None, out=None, err=None,
                  backend_config: Sequence[str] = (), tls: GrpcTls | None = None,
                  admin_key: str | None = None) -> int:
    """`fusionrank serve`: start, print the endpoints, run until Ctrl-C or SIGTERM (exit 0), stop cleanly. A server
    that dies is reported on `err` (how it ended, the tails of its log and console) and gives a non-zero status.
    `admin_key` None: $FUSIONRANK_ADMIN_KEY, else a random key nobody is told (the restricted APIs stay shut)."""
    extra = {"models": tuple(models)} if models else {}
    given = admin_key or admin_key_from_env()
    server = TritonServer.for_spec(spec, repo, profile, log_name="tritonserver",
                                   log_file=Path(log_file) if log_file else None, grpc_port=grpc_port,
                                   http_port=http_port, metrics_port=metrics_port,
                                   reference_ensemble=reference_ensemble, backend_config=backend_config, tls=tls,
                                   admin_key=given, **extra)
    out, err = out or sys.stdout, err or sys.stderr
    stop = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    died = False
    try:
        server.start()
        _print_endpoints(server, out, key_given=given is not None)
        while not stop and server.process.poll() is None:
            time.sleep(0.5)
        died = not stop
        return _report_death(server, err) if died else 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        if not died:
            out.write("server stopped\n")
            out.flush()


def print_triton_args(spec: PipelineSpec, reference_ensemble: bool = False, tls: GrpcTls | None = None,
                      admin_key: str | None = None, out=None, err=None) -> int:
    """`fusionrank serve --print-triton-args`: the flags a server for `spec` adds to tritonserver's (explicit model
    control loading the route and its members, the restricted APIs behind the admin key, TLS), one per line, for the
    image's entrypoint. The key comes from `admin_key`, else $FUSIONRANK_ADMIN_KEY, else is drawn (APIs shut)."""
    out, err = out or sys.stdout, err or sys.stderr
    key = admin_key or admin_key_from_env()
    if key is None:
        err.write(f"no ${ENV_ADMIN_KEY}: {', '.join(RESTRICTED_APIS)} are shut to every caller\n")
    args = policy_args(served_models(spec, reference_ensemble), key or new_admin_key(), tls)
    out.write("".join(f"{arg}\n" for arg in args))
    err.write(f"gRPC: {tls.describe() if tls else 'plaintext'}\n")
    return 0


def _print_endpoints(server: TritonServer, out, key_given: bool) -> None:
    tls = f" ({server.tls.describe()})" if server.tls else " (plaintext)"
    # The key itself is never printed: it would end up in logs.
    doors = (f"need the key in ${ENV_ADMIN_KEY}" if key_given
             else f"shut to every caller (no ${ENV_ADMIN_KEY}: a random key was drawn)")
    out.write(f"Triton ready ({server.profile.value} profile) on {server.repository}\n")
    out.write(f"  models   {', '.join(server.models) if server.models is not None else 'all in the repository'}\n")
    out.write(f"  gRPC     {server.grpc_url}{tls}\n")
    out.write(f"  HTTP     {server.http_url}\n")
    out.write(f"  metrics  {server.metrics_url}\n")
    out.write(f"  log      {server.log_file}\n")
    out.write(f"  pid      {server.process.pid} (tritonserver: `fusionrank soak --pid` measures it)\n")
    out.write(f"  admin    {', '.join(RESTRICTED_APIS)}: {doors}\n")
    out.write("Ctrl-C or SIGTERM stops the server.\n")
    out.flush()


def _report_death(server: TritonServer, err) -> int:
    returncode = server.process.returncode
    status = exit_status_for(returncode)
    err.write(f"tritonserver died: {describe_exit(returncode)}\n{server.log_tail()}\n"
              f"fusionrank serve exits with status {status} so that a supervisor restarts it\n")
    err.flush()
    return status
