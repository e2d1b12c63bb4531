"""Doors of a served Triton: model control, shared memory, trace and logging refused to callers without the admin key
and open with it, over gRPC and HTTP, while inference, health and metadata stay open; the key never in a log; gRPC
over mutual TLS through `fusionrank serve`, with certificates made here and the key from the environment."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import AccessDeniedError, AsyncRankingClient, ClientTls, RankingClient, UnavailableError
from fusionrank.contract.admin import grpc_admin_header, http_admin_header
from fusionrank.contract.spec import Modality
from fusionrank.server.launcher import TritonServer
from tests.certs import make_pki
from tests.processes import stop

# Each restricted group: a gRPC call and an HTTP (method, path, body) that only it answers.
GROUPS = {
    "model-repository": (lambda c, h: c.get_model_repository_index(headers=h), ("POST", "/v2/repository/index", b"{}")),
    "shared-memory": (lambda c, h: c.get_system_shared_memory_status(headers=h),
                      ("GET", "/v2/systemsharedmemory/status", None)),
    "trace": (lambda c, h: c.get_trace_settings(headers=h), ("GET", "/v2/trace/setting", None)),
    "logging": (lambda c, h: c.get_log_settings(headers=h), ("GET", "/v2/logging", None)),
}


def _http(server: TritonServer, method: str, path: str, body: bytes | None, headers: dict | None = None) -> int:
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.e2e
@pytest.mark.parametrize("group", GROUPS)
def test_restricted_api_is_refused_without_the_key_and_open_with_it(triton_server, group):
    grpc_call, (method, path, body) = GROUPS[group]
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        for wrong in (None, {"triton-grpc-protocol-fusionrank-admin-key": "not-the-key"}):
            with pytest.raises(InferenceServerException, match="protocol is restricted"):
                grpc_call(client, wrong)
        grpc_call(client, triton_server.grpc_admin_header)
    assert _http(triton_server, method, path, body) == 403
    assert _http(triton_server, method, path, body, {"fusionrank-admin-key": "not-the-key"}) == 403
    assert _http(triton_server, method, path, body, triton_server.http_admin_header) == 200


@pytest.mark.e2e
def test_inference_health_and_metadata_stay_open(triton_server, ci_spec):
    route = ci_spec.serving.route
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        assert client.is_server_live() and client.is_model_ready(route)
        assert client.get_model_metadata(route).name == route
        assert client.get_inference_statistics(route).model_stats
    for path in ("/v2/health/ready", f"/v2/models/{route}", f"/v2/models/{route}/ready"):
        assert _http(triton_server, "GET", path, None) == 200, path
    with RankingClient(ci_spec, triton_server.grpc_url) as ranking:
        assert ranking.rank_payloads(*_request(ci_spec)).scores.shape == (3,)


def _request(spec, n: int = 3):
    from fusionrank.model.synthetic_data import load_benchmark

    bench = load_benchmark(spec)
    session = int(bench.frozen_sessions(1)[0])
    ids = bench.sessions.candidates[session][:n]
    items = {Modality.TEXT: [bench.item(int(i)).text_bytes() for i in ids],
             Modality.IMAGE: [bench.item(int(i)).image_bytes() for i in ids],
             Modality.AUDIO: [bench.item(int(i)).audio_bytes() for i in ids]}
    return items, bench.sessions.history[session]


@pytest.mark.e2e
def test_shared_memory_works_with_the_key_and_is_refused_without(triton_server, ci_spec):
    items, history = _request(ci_spec)
    with RankingClient(ci_spec, triton_server.grpc_url) as plain:
        expected = plain.rank_payloads(items, history).scores
    with RankingClient(ci_spec, triton_server.grpc_url, shared_memory_threshold=0,
                       admin_key=triton_server.admin_key) as shm:
        np.testing.assert_allclose(shm.rank_payloads(items, history).scores, expected, atol=1e-6)
    with RankingClient(ci_spec, triton_server.grpc_url, shared_memory_threshold=0) as keyless:
        with pytest.raises(AccessDeniedError, match="restricts this API to callers holding its admin key"):
            keyless.rank_payloads(items, history)
        assert keyless.stats.attempts == 1 and keyless.stats.retries == 0, "a refusal is not retried"

    async def over_aio():
        async with AsyncRankingClient(ci_spec, triton_server.grpc_url, shared_memory_threshold=0,
                                      admin_key=triton_server.admin_key) as aclient:
            return await aclient.rank_payloads(items, history)

    import asyncio

    np.testing.assert_allclose(asyncio.run(over_aio()).scores, expected, atol=1e-6)
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        status = client.get_system_shared_memory_status(headers=triton_server.grpc_admin_header, as_json=True)
        assert not status.get("regions"), "every region was unregistered after its call"


@pytest.mark.e2e
def test_the_key_is_in_no_log(triton_server):
    for path in (triton_server.log_file, triton_server.console_file):
        assert triton_server.admin_key not in path.read_text(errors="replace"), path


def _echo_infer(client, timeout: float | None = None) -> list:
    inp = grpcclient.InferInput("x", [1, 1], "INT64")
    inp.set_data_from_numpy(np.ones((1, 1), np.int64))
    return client.infer("echo", [inp], client_timeout=timeout).as_numpy("y").tolist()


@pytest.mark.e2e
def test_serve_over_mutual_tls_with_the_key_from_the_environment(tmp_path, ci_spec):
    """`fusionrank serve` with certificates made here and $FUSIONRANK_ADMIN_KEY, on a small repository: a client
    with the CA and its certificate is served (inference, and the admin APIs with the key); a plaintext client, one
    without a certificate and one trusting another CA are refused, the ranking client saying why; Triton's HTTP
    endpoint (no TLS) then wants the key for inference too, and leaves health open."""
    from .test_serve_cli import _echo_repository, _start_serve

    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", ca_name="other-ca")
    key = "k-" + "7" * 20
    proc, output = _start_serve(_echo_repository(tmp_path), tmp_path / "triton.log", "--grpc-tls-cert",
                                str(pki.crt("server")), "--grpc-tls-key", str(pki.key("server")),
                                "--grpc-tls-client-ca", str(pki.crt("ca")),
                                env={**os.environ, "FUSIONRANK_ADMIN_KEY": key})
    try:
        found = re.search(r"gRPC\s+(\S+) \(mutual TLS\)", output)
        assert found and "need the key in $FUSIONRANK_ADMIN_KEY" in output and key not in output, output
        url, http = found.group(1), re.search(r"HTTP\s+(\S+)", output).group(1)
        full = ClientTls(pki.crt("ca"), pki.key("client"), pki.crt("client"))
        with grpcclient.InferenceServerClient(url, **full.channel_kwargs()) as client:
            assert _echo_infer(client) == [[1]]
            assert client.get_model_repository_index(headers=grpc_admin_header(key)).models
            with pytest.raises(InferenceServerException, match="protocol is restricted"):
                client.get_model_repository_index()
        untrusting = ClientTls(other.crt("other-ca"), pki.key("client"), pki.crt("client"))
        with grpcclient.InferenceServerClient(url, **untrusting.channel_kwargs()) as client:
            with pytest.raises(InferenceServerException, match="andshake failed"):
                _echo_infer(client, timeout=10)
        for tls, hint in ((None, "a TLS endpoint does that to a plaintext client"),
                          (ClientTls(pki.crt("ca")), "a mutual-TLS endpoint to a client without a certificate")):
            with RankingClient(ci_spec, url, tls=tls) as ranking:
                with pytest.raises(UnavailableError, match=hint):
                    ranking.wait_ready(2)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}).encode()
        server = SimpleNamespace(http_url=http)
        assert _http(server, "POST", "/v2/models/echo/infer", body) == 403
        assert _http(server, "POST", "/v2/models/echo/infer", body, http_admin_header(key)) == 200
        assert _http(server, "GET", "/v2/health/ready", None) == 200
    finally:
        stop(proc, timeout=60)
    assert key not in (tmp_path / "triton.log").read_text(errors="replace")
