"""Seeded fuzzing of the real server (plain tritonclient, the `rank` ensemble): hundreds of hostile requests sent
concurrently with valid neighbours. The long run is `python -m tests.robustness.fuzz_server` (see that module)."""

from __future__ import annotations

import pytest

from tests.robustness.fuzz_server import run_server_fuzz

pytestmark = pytest.mark.e2e

CASES = 240


def test_fuzzed_requests_fail_alone_and_cleanly(triton_server, ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    report = run_server_fuzz(triton_server.grpc_url, ci_spec, load_benchmark(ci_spec), cases=CASES, seed=0)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.cases == CASES and report.neighbours >= CASES // 3
    assert report.statuses["StatusCode.INVALID_ARGUMENT"] >= CASES // 3  # most cases are bad, and named as such
    assert triton_server.process.poll() is None, "tritonserver died"
