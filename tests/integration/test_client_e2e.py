"""Ranking clients end to end against real tritonservers (the session's `triton_server`, and a second one for
failover): scores equal offline PyTorch, chunking, typed errors, abandoned calls that leave the server alive."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest

from clients import AsyncRankingClient, DeadlineExceededError, InvalidInputError, RankingClient, RetryPolicy
from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


def _request(bench, ids, session):
    items = {Modality.TEXT: [bench.item(int(i)).text_bytes() for i in ids],
             Modality.IMAGE: [bench.item(int(i)).image_bytes() for i in ids],
             Modality.AUDIO: [bench.item(int(i)).audio_bytes() for i in ids]}
    return items, np.repeat(bench.sessions.history[session][None, :], len(ids), axis=0)


@pytest.mark.e2e
def test_ranking_matches_offline_pytorch(triton_server, ci_spec, bench, reference_pipeline):
    tol, weight_tol = ci_spec.export.tolerance(CLICK_PROBABILITY), ci_spec.export.tolerance(MODALITY_WEIGHTS)
    with RankingClient(ci_spec, triton_server.grpc_url) as client:
        client.wait_ready(30)
        for session in bench.frozen_sessions(3):
            items, history = _request(bench, bench.sessions.candidates[session], int(session))
            served = client.rank_payloads(items, history)
            offline, weights = reference_pipeline.score(items, history)
            np.testing.assert_allclose(served.scores, offline, atol=tol.atol, rtol=tol.rtol)
            np.testing.assert_allclose(served.weights, weights, atol=weight_tol.atol, rtol=weight_tol.rtol)
            assert list(served.order()) == list(np.argsort(-offline, kind="stable"))


@pytest.mark.e2e
def test_more_candidates_than_the_max_batch_are_chunked(triton_server, ci_spec, bench, reference_pipeline):
    n = ci_spec.serving.max_candidates + 7
    ids = (np.arange(n) % bench.num_items) + 1
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, ids, session)
    tol = ci_spec.export.tolerance(CLICK_PROBABILITY)
    with RankingClient(ci_spec, triton_server.grpc_url, shared_memory_threshold=0,
                       admin_key=triton_server.admin_key) as client:
        served = client.rank_payloads(items, history[0])
        assert client.stats.attempts == 2  # two chunks, no retry
    offline, _ = reference_pipeline.score(items, history)
    np.testing.assert_allclose(served.scores, offline, atol=tol.atol, rtol=tol.rtol)

    async def over_aio():
        async with AsyncRankingClient(ci_spec, triton_server.grpc_url) as aclient:
            await aclient.wait_ready(10)
            return await aclient.rank_payloads(items, history)

    np.testing.assert_allclose(asyncio.run(over_aio()).scores, served.scores, atol=1e-6)


@pytest.mark.e2e
def test_deadline_and_invalid_input_surface_as_typed_errors(triton_server, ci_spec, bench):
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, bench.sessions.candidates[session], session)
    with RankingClient(ci_spec, triton_server.grpc_url) as client:
        with pytest.raises(DeadlineExceededError) as late:
            client.rank_payloads(items, history, timeout=0.001)
        # Two right outcomes race at 1 ms: the client's timer fires first and the call is abandoned (left to finish on
        # the server), or the server's queue timeout, set from the same deadline, refuses it first.
        abandoned = "left to finish there" in str(late.value)
        assert abandoned or "Request timeout expired" in str(late.value), str(late.value)
        assert client.stats.abandoned == int(abandoned)
        bad = {m: list(v) for m, v in items.items()}
        bad[Modality.IMAGE][1] = b"\xff\xd8\xff\xe0 not really a jpeg"
        before = client.stats.attempts
        with pytest.raises(InvalidInputError) as info:
            client.rank_payloads(bad, history)
        assert client.stats.attempts == before + 1 and client.stats.retries == 0
        assert "item_image" in info.value.server_message and info.value.status == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.e2e
def test_calls_past_their_deadline_leave_the_server_serving(triton_server, ci_spec):
    # Regression guard: Triton 2.51 segfaults when clients cancel in-flight ensemble requests
    # (triton-inference-server/server#7368), so the client abandons a late call instead. With abandon_grace=0
    # (cancel at the deadline) this test failed 3 runs out of 3, the server dying in round 3 or 4.
    from tests.robustness.deadline_stress import stress

    out = io.StringIO()
    assert stress(ci_spec, triton_server.grpc_url, rounds=30, abandon_grace=30.0,
                  alive=lambda: triton_server.process.poll() is None, out=out) == 30, out.getvalue()
    assert "the server still serves" in out.getvalue() and "0 cancelled" in out.getvalue()


@pytest.mark.e2e
def test_failover_between_two_real_servers_loses_no_call(triton_server, built_repository, ci_spec, bench,
                                                         tmp_path):
    from fusionrank.contract.spec import served_models
    from fusionrank.server.launcher import TritonServer

    # The route and its members only (not the reference ensemble): a quicker start.
    second = TritonServer(built_repository, profile="cpu", log_file=tmp_path / "second.log",
                          cache=tmp_path / "backend", models=served_models(ci_spec))
    second.start(timeout=300)
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, bench.sessions.candidates[session][:4], session)
    served_by, errors, stop = [], [], threading.Event()
    try:
        with RankingClient(ci_spec, [second.grpc_url, triton_server.grpc_url], recheck_interval=60,
                           retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.05)) as client:
            client.wait_ready(60, all_endpoints=True)
            expected = client.rank_payloads(items, history).scores

            def loop():
                while not stop.is_set():
                    try:
                        np.testing.assert_allclose(client.rank_payloads(items, history).scores, expected, atol=1e-6)
                        served_by.append(time.monotonic())
                    except Exception as exc:  # every failure is collected and reported below
                        errors.append(exc)

            worker = threading.Thread(target=loop)
            worker.start()
            time.sleep(2.0)
            before_stop = len(served_by)
            second.stop()
            stopped_at = time.monotonic()
            time.sleep(2.0)
            stop.set()
            worker.join(timeout=60)
    finally:
        stop.set()
        second.stop()
    assert not errors, f"failed calls during failover: {errors[:3]}"
    assert before_stop >= 2 and sum(t > stopped_at for t in served_by) >= 2
    assert client.pool.endpoints[0].down_since is not None, "the stopped server should be marked down"


@pytest.mark.e2e
def test_rank_command_prints_a_ranked_table_and_json(triton_server, ci_spec, bench, tmp_path, capsys):
    import json

    from fusionrank_cli.rank_command import rank_benchmark_request, run_rank

    table = rank_benchmark_request(ci_spec, triton_server.grpc_url, user=0, candidates=12).splitlines()
    rows = table[3:-1]
    assert table[1].split()[:4] == ["rank", "item", "title", "score"] and table[1].split()[4:] == ["text", "image",
                                                                                                  "audio", "sent"]
    assert [int(r.split()[0]) for r in rows] == list(range(1, 13))
    scores = [float(r.split()[-5]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r.split()[-1] for r in rows} == {"TIA-"}

    ragged = rank_benchmark_request(ci_spec, triton_server.grpc_url, user=0, candidates=12, ragged=True)
    rows = [r.split() for r in ragged.splitlines()[3:-1]]
    sent = {r[-1] for r in rows}
    assert {"TI--", "T---", "T-AV"} <= sent, sent
    for r in rows:  # an absent modality's weight is exactly 0 (a clip is the image)
        text, image, audio, video = (letter != "-" for letter in r[-1])
        weights = [float(w) for w in r[-4:-1]]
        assert all(w == 0.0 for w, sent in zip(weights, (text, image or video, audio)) if not sent), r
        assert abs(sum(weights) - 1) < 0.01, r

    items = [bench.item(i) for i in (3, 9)]
    (tmp_path / "cands.json").write_text(json.dumps({"history": [5, 6], "candidates": [
        {"id": it.item_id, "text": it.title, "image": str(it.image_path), "audio": str(it.audio_path)}
        for it in items]}))
    assert run_rank(ci_spec, f"127.0.0.1:1,{triton_server.grpc_url}", items=[str(tmp_path / "cands.json")],
                    as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    ranking = out["ranking"]
    assert sorted(r["item_id"] for r in ranking) == [3, 9] and ranking[0]["score"] >= ranking[1]["score"]
    assert set(ranking[0]["modality_weights"]) == {"text", "image", "audio"}
