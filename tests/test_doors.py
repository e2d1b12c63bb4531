"""Doors of a served Triton: model control, shared memory, trace and logging refused to callers without the admin key
and open with it, over gRPC and HTTP, while inference, health and metadata stay open; the key never in a log; gRPC
over one-way TLS with certificates made here. (Mutual TLS through `fusionrank serve` and the ranking client is in
tests/test_faults.py, on the server that test module starts the way production runs it.)"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import AccessDeniedError, AsyncRankingClient, RankingClient
from fusionrank.serving.doors import DoorError, GrpcTls, check_admin_key
from fusionrank.serving.server import TritonServer, policy_args
from fusionrank.spec import Modality

from .certs import make_pki

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


def test_policy_flags_and_key_checks(tmp_path):
    args = policy_args(["rank", "fusion_ranker"], "k-1")
    assert args[:3] == ["--model-control-mode=explicit", "--load-model=rank", "--load-model=fusion_ranker"]
    assert "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:fusionrank-admin-key=k-1" in args
    assert not any("ssl" in a for a in args)
    for bad in ("", "a:b", "a,b", "a=b", "with space"):
        with pytest.raises(DoorError, match="admin key"):
            check_admin_key(bad)
    (tmp_path / "server.crt").write_text("pem")
    with pytest.raises(DoorError, match="server key .*missing.key is not a file"):
        GrpcTls(tmp_path / "server.crt", tmp_path / "missing.key")


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
    from fusionrank.benchmark import load_benchmark

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


@pytest.mark.e2e
def test_one_way_tls_on_a_small_server(tmp_path):
    """gRPC over TLS: a client trusting the CA is served, a plaintext client and one trusting another CA are not;
    Triton's HTTP endpoint (no TLS) then wants the key for inference too."""
    from .test_serve_cli import _echo_repository

    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", ca_name="other-ca")
    tls = GrpcTls(pki.crt("server"), pki.key("server"))
    x = np.ones((1, 1), np.int64)
    with TritonServer(_echo_repository(tmp_path), profile="cpu", log_file=tmp_path / "triton.log",
                      cache=tmp_path / "backend", tls=tls, exit_timeout_s=3) as server:
        inp = grpcclient.InferInput("x", [1, 1], "INT64")
        inp.set_data_from_numpy(x)
        with grpcclient.InferenceServerClient(server.grpc_url, ssl=True,
                                              root_certificates=str(pki.crt("ca"))) as client:
            assert client.infer("echo", [inp]).as_numpy("y").tolist() == [[1]]
        for kwargs, message in (({}, "Socket closed"),
                                ({"ssl": True, "root_certificates": str(other.crt("other-ca"))}, "andshake failed")):
            with grpcclient.InferenceServerClient(server.grpc_url, **kwargs) as client:
                with pytest.raises(InferenceServerException, match=message):
                    client.infer("echo", [inp], client_timeout=10)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}).encode()
        assert _http(server, "POST", "/v2/models/echo/infer", body) == 403
        assert _http(server, "POST", "/v2/models/echo/infer", body, server.http_admin_header) == 200
        assert _http(server, "GET", "/v2/health/ready", None) == 200
