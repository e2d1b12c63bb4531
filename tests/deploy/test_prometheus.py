"""Monitoring against the real thing: a real Prometheus (Debian package `prometheus`) started on loopback scrapes
the session's real Triton every second during a short load, evaluates deploy/monitoring/rules.yml, and every
expression the autoscaler (prometheus-adapter rule), the alerts and the dashboard panels use must return data.
`promtool check rules` and `promtool test rules` run on the same rule file."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from fusionrank.contract.tensors import infer_inputs, request_arrays
from fusionrank.server.launcher import free_port
from tests.paths import REPO_ROOT
from tests.processes import stop

MONITORING = REPO_ROOT / "deploy" / "monitoring"
RULES = yaml.safe_load((MONITORING / "rules.yml").read_text())
DASHBOARD = json.loads((MONITORING / "grafana" / "dashboards" / "fusionrank.json").read_text())
ADAPTER = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "prometheus-adapter-values.yaml").read_text())
# The target labels the PodMonitor attaches in Kubernetes (and the compose scrape config sets).
TARGET_LABELS = {"namespace": "test", "pod": "triton-0", "container": "triton"}
LOAD_S = 8.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs the Debian package `prometheus`")
    return path


def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run([_binary("promtool"), "check", "rules", "rules.yml"], cwd=MONITORING,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([_binary("promtool"), "test", "rules", "rules.test.yml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def prometheus(triton_server, tmp_path_factory):
    """A Prometheus on a free loopback port scraping `triton_server` every second; stopped after the module."""
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy2(MONITORING / "rules.yml", folder / "rules.yml")
    target = triton_server.metrics_url.split("//", 1)[1].split("/", 1)[0]
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "fusionrank",
                            "static_configs": [{"targets": [target], "labels": TARGET_LABELS}]}]}))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen([_binary("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not start:\n{(folder / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        stop(proc, timeout=20)
        log.close()


def _load(grpc_url: str, spec, seconds: float) -> int:
    """Ranking requests from the CI scenario in three threads for `seconds`, plus one bad request (an item id out
    of vocabulary) so the route's error counter carries a count. Returns the number of good requests answered."""
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.request.scenario import RequestFactory, load_scenario

    bench = load_benchmark(spec)
    done, stop = [], time.monotonic() + seconds

    def user(seed: int) -> None:
        factory = RequestFactory(spec, bench, load_scenario("ci"), seed=seed)
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(grpc_url) as client:
            while time.monotonic() < stop:
                try:
                    client.infer(spec.serving.route, infer_inputs(grpcclient, factory.next().arrays()),
                                 client_timeout=60)
                except InferenceServerException as exc:  # over capacity: refused, as a caller would, back off
                    if str(exc.status()) != "StatusCode.UNAVAILABLE":
                        raise
                    time.sleep(0.1)
                    continue
                done.append(1)

    threads = [threading.Thread(target=user, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    request = RequestFactory(spec, bench, load_scenario("ci"), seed=9).next()
    items, history = request.items, request.history
    bad = np.full_like(history, spec.ranker.history.vocab_size + 5)
    with grpcclient.InferenceServerClient(grpc_url) as client, pytest.raises(Exception, match="user_history"):
        client.infer(spec.serving.route, infer_inputs(grpcclient, request_arrays(items, bad)))
    for t in threads:
        t.join()
    return len(done)


def _adapter_query(rule: dict) -> str:
    """The adapter's metricsQuery as it sends it for the pods of one namespace (LabelMatchers, GroupBy)."""
    matchers = f'namespace="{TARGET_LABELS["namespace"]}",pod=~"{TARGET_LABELS["pod"]}"'
    return rule["metricsQuery"].replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def _expressions() -> dict[str, str]:
    """Every expression to prove: recording rules, each alert's signal (its threshold comparison cut off), each
    dashboard target, and the adapter's series and metrics queries."""
    exprs = {}
    for group in RULES["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                exprs[f"record {rule['record']}"] = rule["expr"]
                exprs[f"recorded {rule['record']}"] = rule["record"]
            else:
                signal_expr, threshold = re.fullmatch(r"(.+?)\s*>\s*([\d.e+]+)", rule["expr"].strip()).groups()
                exprs[f"alert {rule['alert']} (> {threshold})"] = signal_expr
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for n, rule in enumerate(ADAPTER["rules"]["custom"]):
        exprs[f"adapter rule {n} metricsQuery"] = _adapter_query(rule)
    return exprs


def _instant(prometheus: str, expr: str, at: float | None = None) -> list[dict]:
    query = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    body = _get(f"{prometheus}/api/v1/query?{urllib.parse.urlencode(query)}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def _route_answers(prometheus: str, since: float) -> dict[str, float]:
    """The route's responses by status code since `since` (a Unix time before the load), from the counter's values
    then and now: exact counts, not `increase()`'s extrapolation, and only this test's requests."""
    expr = 'sum by (code) (fusionrank_route_responses{model="rank"})'
    now = {s["metric"]["code"]: float(s["value"][1]) for s in _instant(prometheus, expr)}
    then = {s["metric"]["code"]: float(s["value"][1]) for s in _instant(prometheus, expr, at=since)}
    return {code: value - then.get(code, 0.0) for code, value in now.items()}


@pytest.mark.e2e
def test_every_autoscaler_alert_and_dashboard_expression_returns_data(prometheus, triton_server, ci_spec):
    started = time.monotonic()
    # The route's response series exist (at 0) from its initialize: wait for a scrape of them, to count from.
    while not _instant(prometheus, "fusionrank_route_responses") and time.monotonic() < started + 30:
        time.sleep(0.5)
    started_at = time.time()
    answered = _load(triton_server.grpc_url, ci_spec, LOAD_S)
    assert answered > 0
    exprs = _expressions()
    assert len([k for k in exprs if k.startswith("panel")]) >= 10
    # Recording rules run every second; give them and the last scrape a moment after the load.
    deadline, empty = time.monotonic() + 30, dict(exprs)
    while empty and time.monotonic() < deadline:
        empty = {k: e for k, e in empty.items()
                 if not any(math.isfinite(float(s["value"][1])) for s in _instant(prometheus, e))}
        if empty:
            time.sleep(1)
    assert not empty, "no finite data for:\n" + "\n".join(f"{k}: {e}" for k, e in empty.items())

    # Values a person reads on the dashboard, checked against what the load did: the route counts its answers by
    # status itself (Triton 2.51 counts its error responses as successes, server#7713).
    deadline = time.monotonic() + 15  # until a scrape after the last answer, and a rule evaluation after that scrape
    while True:
        answers = _route_answers(prometheus, started_at)
        ratio = float(_instant(prometheus, "fusionrank:rank_error_ratio")[0]["value"][1])
        if answers.get("OK", 0) >= answered and ratio > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answers.get("OK", 0) >= answered, answers
    assert answers.get("INVALID_ARGUMENT", 0) >= 1, f"the bad request must be counted as an error: {answers}"
    assert 0 < ratio <= 1, "the bad request must show in the error ratio"
    p99 = _instant(prometheus, "fusionrank:rank_p99_ms")
    assert float(p99[0]["value"][1]) > 0
    batch = [s for s in _instant(prometheus, DASHBOARD["panels"][6]["targets"][0]["expr"])
             if s["metric"]["model"] == "text_encoder"]
    assert float(batch[0]["value"][1]) >= 1.0
    hit_ratio = float(_instant(prometheus, "fusionrank:cache_hit_ratio")[0]["value"][1])
    assert 0 < hit_ratio <= 1, "the load repeats hot items: the route's embedding cache must have found some"
    hpa = _instant(prometheus, _adapter_query(ADAPTER["rules"]["custom"][0]))
    assert [s["metric"] for s in hpa] == [{"pod": TARGET_LABELS["pod"]}]
    triton_failed = _instant(prometheus, 'sum by (reason) (nv_inference_request_failure{model="rank"})')
    print(f"\nprometheus test: {answered} requests, route answers {answers}, error ratio {ratio:.4f}, Triton's "
          f"failures of the route {[(s['metric'].get('reason'), s['value'][1]) for s in triton_failed]}, "
          f"{len(exprs)} expressions with data, {time.monotonic() - started:.1f}s")


@pytest.mark.e2e
def test_adapter_series_query_finds_the_pod_series(prometheus):
    rule = ADAPTER["rules"]["custom"][0]
    body = _get(f"{prometheus}/api/v1/series?{urllib.parse.urlencode({'match[]': rule['seriesQuery']})}")
    assert body["status"] == "success" and body["data"], body
    assert all(s["namespace"] == TARGET_LABELS["namespace"] and s["pod"] == TARGET_LABELS["pod"]
               for s in body["data"])
    assert re.fullmatch(rule["name"]["matches"], body["data"][0]["__name__"])
