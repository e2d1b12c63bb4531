"""The soak verdict without a server: growth, vanished processes and failures are named."""

from __future__ import annotations


def test_soak_verdict_names_growth_vanished_processes_and_failures():
    from loadtest.soak import Load, Memory, SoakResult

    start = {1: Memory("tritonserver", 80.0, 40.0), 2: Memory("stub rank", 300.0, 230.0)}
    steady = SoakResult(start, {1: Memory("tritonserver", 90.0, 50.0), 2: Memory("stub rank", 301.0, 231.0)},
                        Load(latencies_ms=[10.0]), 10.0, max_growth_mb=64)
    assert steady.problems == [] and "soak verdict: PASS" in steady.render()
    grown = SoakResult(start, {1: Memory("tritonserver", 80.0, 40.0), 3: Memory("stub rank", 400.0, 300.0)},
                       Load(latencies_ms=[10.0], failures=1, messages=["boom"]), 10.0, max_growth_mb=64)
    assert any("stub rank (pid 2) ended" in p for p in grown.problems)
    assert any("pid 3) appeared" in p for p in grown.problems)
    assert any("1 request(s) failed, e.g. boom" in p for p in grown.problems)
    leaked = SoakResult(start, {1: Memory("tritonserver", 80.0, 40.0), 2: Memory("stub rank", 400.0, 330.0)},
                        Load(latencies_ms=[10.0]), 10.0, max_growth_mb=64)
    assert leaked.problems == ["stub rank (pid 2) grew +100.0 MiB (PSS), bound 64"]
    assert "soak verdict: FAIL" in leaked.render()
    cached = SoakResult(start, leaked.end, Load(latencies_ms=[10.0]), 10.0, max_growth_mb=64,
                        allowance_mb={"stub rank": 64.0})
    assert cached.problems == [] and "stub rank +64 MiB (its cache)" in cached.render()
