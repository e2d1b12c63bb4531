"""Start a real Triton server locally, without Docker or a GPU.

`tritonserver` comes from PATH when present (inside the NGC container), else from the PyPI package
`nvidia-pytriton`, which ships Triton with the Python backend. That binary needs the wheel's bundled libraries on
LD_LIBRARY_PATH and a backend directory holding `python/libtriton_python.so` plus the stub built for the running
Python; the directory is assembled in the cache folder (never inside site-packages). The stub imports packages from
the first `python3` on PATH, so this interpreter's `bin/` goes first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fusionrank.contract.admin import check_admin_key, grpc_admin_header, http_admin_header
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import PipelineSpec, ServingProfile, served_models
from fusionrank.route.cache import LOCAL_CACHE_ENV
from fusionrank.server.backends import default_backend_dir, missing_backends
from fusionrank.server.doors import GrpcTls, new_admin_key, restricted_args
from fusionrank.server.local_cache import LocalCacheServer, dies_with_this_process

log = logging.getLogger(__name__)

class LaunchError(FusionRankError):
    """The Triton server could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path | None  # None: the binary's own default (/opt/tritonserver/backends in the NGC image)
    cache_dir: Path | None
    env: dict[str, str]

    @property
    def backends(self) -> Path:
        """The folder this binary loads backends from."""
        return self.backend_dir or default_backend_dir(self.binary)


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path | None:
    # Located, not imported: only its tritonserver is used, and importing pytriton pulls in its client stack.
    found = importlib.util.find_spec("pytriton")
    return Path(found.origin).resolve().parent if found and found.origin else None


def _build_backend_dir(server_root: Path, cache: Path) -> Path:
    """`<cache>/backends/python/` with libtriton_python.so and the stub for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"nvidia-pytriton ships no Python backend stub for Python {version} ({stub})")
    target = cache / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (server_root / "backends" / "python" / "libtriton_python.so",
                server_root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target.parent


def find_triton(cache: Path | None = None) -> TritonInstall:
    """Locate a runnable tritonserver and the environment it needs."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, None, env)
    root = _pytriton_root()
    if root is None:
        raise LaunchError("no tritonserver on PATH and nvidia-pytriton is not installed (pip install nvidia-pytriton)")
    server_root = root / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    # The stub links libpython3.X.so dynamically: give it this interpreter's own, else it may pick up the
    # distribution's build, whose C extensions (e.g. _ssl) then fail with undefined symbols.
    libpython = sysconfig.get_config_var("LIBDIR")
    paths = (str(libs), libpython if libpython and Path(libpython, sysconfig.get_config_var("INSTSONAME") or "-")
             .is_file() else "", env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    cache = cache or Path(tempfile.gettempdir()) / "fusionrank-triton"
    return TritonInstall(server_root / "bin" / "tritonserver", _build_backend_dir(server_root, cache),
                         server_root / "caches", env)


def policy_args(models: Sequence[str] | None, admin_key: str, tls: GrpcTls | None = None) -> list[str]:
    """Triton's flags for what is served and who may do what: explicit model control loading exactly `models`
    (None: every model in the repository), the restricted APIs behind `admin_key`, TLS for gRPC. The image's
    entrypoint takes the same flags (`fusionrank serve --print-triton-args`)."""
    args = []
    if models is not None:
        args += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
    args += restricted_args(admin_key, tls=tls is not None)
    return args + (tls.args() if tls is not None else [])


class TritonServer:
    """A tritonserver process on loopback ports; a context manager that always stops it (process group included)."""

    def __init__(self, repository: Path, profile: ServingProfile | str = ServingProfile.CPU, grpc_port: int = 0,
                 http_port: int = 0, metrics_port: int = 0, log_file: Path | None = None,
                 extra_args: Sequence[str] = (), cache: Path | None = None, host: str = "127.0.0.1",
                 exit_timeout_s: int = 10, backend_config: Sequence[str] = (), models: Sequence[str] | None = None,
                 admin_key: str | None = None, tls: GrpcTls | None = None, local_cache_bytes: int = 0):
        try:
            self.profile = ServingProfile(profile)
        except ValueError:
            raise LaunchError(f"unknown profile {profile!r}; allowed: "
                              f"{', '.join(p.value for p in ServingProfile)}") from None
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise LaunchError(f"model repository {self.repository} does not exist")
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        # Triton's own stdout/stderr: a crash's "Signal (11) received" and stack trace go there, not to the log file.
        self.console_file = self.log_file.with_name(self.log_file.stem + ".console.log")
        # Explicit model control with exactly these models loaded (None: every model in the repository).
        self.models = tuple(models) if models is not None else None
        # Load/unload (explicit control), shared memory, trace and logging: only callers sending the admin key
        # (fusionrank.server.doors). None: a key drawn at each start, for this object's holder only.
        self.admin_key = check_admin_key(admin_key) if admin_key is not None else new_admin_key()
        self.tls = tls  # None: plaintext gRPC
        self.extra_args = list(extra_args)
        # `--backend-config` values, e.g. "tensorrt,version-compatible=true" for version-compatible plans.
        self.backend_config = list(backend_config)
        self.cache = cache
        self.host = host
        # Triton 2.51 keeps an ensemble request cancelled by a client deadline counted as in flight, so a stop
        # waits the whole exit timeout (30 s by default) before exiting: keep it short (the reference ensemble
        # may be loaded).
        self.exit_timeout_s = exit_timeout_s
        # > 0: one item-embedding cache for every route instance, a redis-server on a Unix socket started before
        # Triton and stopped after it (fusionrank.server.local_cache); 0: each instance keeps its in-process LRU.
        self.local_cache_bytes = local_cache_bytes
        self.local_cache: LocalCacheServer | None = None
        self.process: subprocess.Popen | None = None

    @property
    def grpc_admin_header(self) -> dict[str, str]:
        """gRPC metadata that opens the restricted APIs (model repository, shared memory, trace, logging)."""
        return grpc_admin_header(self.admin_key)

    @property
    def http_admin_header(self) -> dict[str, str]:
        """HTTP header that opens the restricted APIs."""
        return http_admin_header(self.admin_key)

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [str(install.binary), f"--model-repository={self.repository}",
               f"--grpc-address={self.host}", f"--http-address={self.host}", f"--metrics-address={self.host}",
               f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}",
               f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
               # Latency summaries (p50..p99.9 per model): what the p99 alert and dashboard read, as in the image.
               "--metrics-config=summary_latencies=true", "--exit-on-error=true",
               "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-file={self.log_file}"]
        if self.profile.config_name:
            cmd.append(f"--model-config-name={self.profile.config_name}")
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if install.cache_dir:
            cmd.append(f"--cache-directory={install.cache_dir}")
        cmd += [f"--backend-config={value}" for value in self.backend_config]
        return cmd + policy_args(self.models, self.admin_key, self.tls) + self.extra_args

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Start the server and wait until it and every model in the repository are ready."""
        install = find_triton(self.cache)
        # Refuse before starting: Triton would start, fail to load those models and exit with a long log.
        lacking = missing_backends(self.repository, self.profile, install.backends)
        if lacking:
            raise LaunchError(f"{install.binary}: {lacking}")
        cmd = self.command(install)
        env = dict(install.env)
        log.info("starting %s", " ".join(cmd).replace(self.admin_key, "***"))
        try:
            if self.local_cache_bytes:
                self.local_cache = LocalCacheServer(self.local_cache_bytes).start()
                env[LOCAL_CACHE_ENV] = self.local_cache.url  # the Python-backend stubs inherit it
            # A new session, so stop() can signal the server and its Python-backend stubs together; SIGTERM when this
            # process ends however it ends (a killed benchmark or test run left servers behind, using the cores).
            with open(self.console_file, "wb") as console:
                self.process = subprocess.Popen(cmd, env=env, stdout=console, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=dies_with_this_process())
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll HTTP `/v2/health/ready` (open in every setting, TLS on gRPC included), then the metrics endpoint,
        until both answer 200. Triton starts its metrics service after the HTTP one: a server ready on HTTP refused
        a scrape made at once (seen: 42 ms apart, `fusionrank tune`'s first read of a fresh server's counters)."""
        deadline = time.monotonic() + timeout
        pending = [f"http://{self.http_url}/v2/health/ready", self.metrics_url]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"tritonserver {describe_exit(self.process.returncode)} during start-up\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(pending[0], timeout=2.0) as answer:
                    if answer.status == 200:
                        pending.pop(0)
                        if not pending:
                            return
                        continue
            except (urllib.error.URLError, OSError):  # not listening yet, or not ready (400)
                pass
            time.sleep(0.5 if len(pending) > 1 else 0.05)
        raise LaunchError(f"tritonserver not ready after {timeout:.0f}s; log: {self.log_file}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Triton's log file and of its console output (where a crash's trace goes)."""
        parts = []
        for label, path in (("log", self.log_file), ("console", self.console_file)):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = []
            body = "\n".join(f"  {line}" for line in tail) if tail else "  (empty)"
            parts.append(f"last {len(tail)} lines of its {label} ({path}):\n{body}")
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `timeout` seconds. A server that already
        died (a crash) leaves its Python-backend stubs running in its group: they are killed too. The server-wide
        cache stops after them."""
        try:
            self._stop_triton(timeout)
        finally:
            if self.local_cache is not None:
                self.local_cache.stop()
                self.local_cache = None

    def _stop_triton(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in %.0fs; killing it", timeout)
        except ProcessLookupError:
            pass
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    @classmethod
    def for_spec(cls, spec: PipelineSpec, repository: Path, profile: ServingProfile | str = ServingProfile.CPU,
                 log_name: str = "tritonserver", log_file: Path | None = None, reference_ensemble: bool = False,
                 **kwargs) -> TritonServer:
        """A server for the spec's project: the spec's served models (the route and its members; the reference
        ensemble too when asked), backend folder under the spec's cache, log in `<cache>/logs/<log_name>-<time>.log`
        unless `log_file` is given. `models=` names other models to load instead."""
        cache = cache_dir(spec)
        if log_file is None:
            log_file = cache / "logs" / f"{log_name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("models", served_models(spec, reference_ensemble))
        kwargs.setdefault("local_cache_bytes", spec.serving.cache.server_tier_bytes)
        return cls(repository, profile, log_file=log_file, cache=cache / "triton", **kwargs)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def describe_exit(returncode: int) -> str:
    """How a process ended, in words: `killed by signal 11 (SIGSEGV)` or `exited with status 1`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def exit_status_for(returncode: int) -> int:
    """The exit status `fusionrank serve` passes on for a server that died: a shell's 128+N for signal N, the
    server's own status otherwise, 1 for a server that exited 0 without being asked to (never 0: a supervisor
    must restart it)."""
    if returncode < 0:
        return 128 - returncode
    return returncode or 1
