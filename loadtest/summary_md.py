"""`summary.md` of a load test: Markdown tables a person reads (the verdict once, then the SLO table with sample
counts, the load delivered, the latency, the baseline comparison, the server-side breakdown, provenance, plots)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def _num(x, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _slo_rows(verdict) -> list[str]:
    rows = ["| SLO | measured | target | samples (needed) | result |", "|---|---|---|---|---|"]
    for c in verdict.checks:
        count = "" if c.needed is None else f"{c.samples} ({c.needed})"
        result = "pass" if c.passed else ("**too few samples**" if not c.supported else "**FAIL**")
        rows.append(f"| {c.name} | {_num(c.measured)} | {c.comparison} {_num(c.target)} | {count} | {result} |")
    return rows


def _load_rows(summary: dict) -> list[str]:
    pacing = summary.get("pacing") or {}
    rows = ["| load | value |", "|---|---|",
            f"| loop | {pacing.get('mode', '?')} ({summary.get('users')} users, spawn rate "
            f"{_num(summary.get('spawn_rate'))}/s) |",
            f"| requests | {summary.get('requests')} ({summary.get('failures')} failed, error rate "
            f"{_num(100 * summary.get('error_rate', 0), '.2f')} %) |",
            f"| duration | {_num(summary.get('duration_s'), '.1f')} s |",
            f"| throughput | {_num(summary.get('throughput_rps'), '.3g')} successful req/s |"]
    if pacing.get("offered_rate"):
        rows.append(f"| offered rate | {_num(pacing['offered_rate'], '.3g')} req/s (Poisson) |")
    if pacing.get("delivered_rate") is not None:
        off = pacing.get("delivered_vs_offered")
        rows.append(f"| delivered rate | {_num(pacing['delivered_rate'], '.3g')} req/s"
                    + (f" ({off:+.1%} vs offered)" if off is not None else "") + " |")
        rows.append(f"| inter-arrival | mean {_num(1000 * pacing['mean_gap_s'], '.3g')} ms, CV "
                    f"{_num(pacing.get('gap_cv'), '.2f')} (1 for exponential), KS p "
                    f"{_num(pacing.get('exponential_ks_p'), '.2g')} |")
    if pacing.get("late") is not None:
        rows.append(f"| late arrivals | {pacing['late']} of {pacing.get('arrivals')} due (every user busy) |")
        if pacing.get("sent_vs_due") is not None:
            rows.append(f"| sent vs due | {pacing['sent_vs_due']:+.1%} (the drawn Poisson schedule; it varies by "
                        f"1/sqrt(n) = {1 / max(1, pacing.get('arrivals') or 1) ** 0.5:.1%} around the offered rate) |")
    return rows


def _latency_rows(summary: dict) -> list[str]:
    return ["| latency (successful requests) | ms |", "|---|---|",
            *(f"| {k[:-3]} | {_num(summary.get(k), '.4g')} |" for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms",
                                                                      "max_ms")),
            f"| candidates per request | {_num(summary.get('mean_candidates'), '.3g')} |"]


def _provenance_rows(prov: dict) -> list[str]:
    if not prov:
        return []
    machine = prov.get("machine") or {}
    rows = ["## Provenance", "", "| what | value |", "|---|---|",
            f"| fusionrank | {prov.get('fusionrank_version')} (commit {prov.get('commit')}) |",
            f"| spec digest | {prov.get('spec_digest')} |",
            f"| Triton | {prov.get('triton_version') or 'unknown'} |",
            f"| CPU | {machine.get('model')}, {machine.get('cores')} cores |",
            f"| CPU flags | {' '.join(machine.get('flags') or []) or '-'} |",
            f"| load average (1, 5, 15 min) | {' '.join(str(x) for x in machine.get('load_average') or [])} |"]
    rows += [f"| model file {name} | {digest or 'missing'} |" for name, digest in
             (prov.get("model_digests") or {}).items()]
    if not prov.get("model_digests"):
        rows.append("| model files | not local (digests with --serve or --repository) |")
    return rows + [""]


def render_summary_md(verdict, plots: Sequence[Path] = ()) -> str:
    """The whole summary.md."""
    s = verdict.summary
    lines = [f"# Load test: {verdict.scenario}", "",
             f"**SLO verdict: {'PASS' if verdict.passed else 'FAIL'}** ({verdict.slo_source}), "
             f"against {s.get('url', '?')}", "", *_slo_rows(verdict), ""]
    lines += [f"- {c.describe()}" for c in verdict.missed]
    lines += [""] + _load_rows(s) + [""] + _latency_rows(s) + [""]
    if verdict.baseline:
        b = verdict.baseline
        lines += ["## Against the baseline run", "", f"Baseline: `{b['baseline']}`. "
                  + (b.get("describe") or b.get("note", "")), ""]
    if verdict.members:
        lines += ["## Server side per model (Triton metrics, this run)", "",
                  "| model | requests | failures | rows | executions | avg batch | queue ms | compute ms | total ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in verdict.members:
            lines.append(f"| {m.model} | {m.requests} | {m.failures} | {m.inferences} | {m.executions} | "
                         f"{m.avg_batch:.2f} | {m.queue_ms:.1f} | {m.compute_ms:.1f} | {m.request_ms:.1f} |")
        lines.append("")
    if verdict.cache:
        lines += [verdict.cache.describe(), ""]
    if verdict.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in verdict.notes), ""]
    lines += _provenance_rows(verdict.provenance)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Locust's own report: [locust.html](locust.html), CSV: `locust_stats.csv`, "
              "`locust_stats_history.csv`, `locust_failures.csv`; per-request samples: `samples/`."]
    return "\n".join(lines) + "\n"
