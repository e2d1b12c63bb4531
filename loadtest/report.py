"""Load-test results: client-side summary, SLO verdict, Markdown/JSON summary and PNG plots.

Latency percentiles come from the per-request times the Locust file records (exact, not Locust's rounded
buckets); Locust's own CSV is the fallback when no samples came back (e.g. remote workers of a distributed run).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.lib import min_samples
from benchmarks.server_metrics import CacheShare, MemberStats
from benchmarks.server_metrics import format_table as format_members
from loadtest.slo import Slo
from loadtest.summary_md import render_summary_md

SAMPLE_FIELDS = ("start", "latency_ms", "candidates", "ok")


@dataclass(frozen=True)
class Samples:
    """Per-request records of a run: wall-clock start (s), latency (ms), candidates, success."""

    start: np.ndarray
    latency_ms: np.ndarray
    candidates: np.ndarray
    ok: np.ndarray

    def __len__(self) -> int:
        return len(self.latency_ms)


def read_samples(folder: Path) -> Samples:
    """Every `*.csv` sample file a Locust process wrote into `folder`, merged and sorted by start time."""
    rows = []
    for path in sorted(Path(folder).glob("*.csv")):
        with path.open() as f:
            for rec in csv.reader(f):
                if len(rec) == len(SAMPLE_FIELDS):
                    try:
                        rows.append((float(rec[0]), float(rec[1]), int(rec[2]), rec[3] == "1"))
                    except ValueError:
                        continue  # a line cut short by a killed process
    rows.sort()
    if not rows:
        return Samples(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    cols = list(zip(*rows))
    return Samples(np.array(cols[0]), np.array(cols[1]), np.array(cols[2], dtype=np.int64),
                   np.array(cols[3], dtype=bool))


def summarize_samples(samples: Samples) -> dict:
    """Throughput (successful requests per second), latency percentiles of successful requests, error rate."""
    total = len(samples)
    ok = samples.latency_ms[samples.ok]
    failures = int(total - len(ok))
    if total:
        end = samples.start + samples.latency_ms / 1000.0
        duration = float(end.max() - samples.start.min())
    else:
        duration = 0.0
    pct = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: math.nan)
    return {
        "requests": total,
        "latency_samples": int(len(ok)),  # successful requests: what a percentile gate can be supported by
        "failures": failures,
        "error_rate": failures / total if total else 1.0,
        "duration_s": duration,
        "throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "candidates_per_s": float(samples.candidates[samples.ok].sum()) / duration if duration > 0 else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_ms": float(ok.mean()) if len(ok) else math.nan,
        "max_ms": float(ok.max()) if len(ok) else math.nan,
        "mean_candidates": float(samples.candidates.mean()) if total else 0.0,
        "source": "samples",
    }


def summarize_locust_csv(stats_csv: Path) -> dict:
    """The same figures from the 'Aggregated' row of Locust's `<prefix>_stats.csv` (percentiles rounded)."""
    with Path(stats_csv).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    if not rows:
        return {"requests": 0, "failures": 0, "error_rate": 1.0, "throughput_rps": 0.0, "p50_ms": math.nan,
                "p95_ms": math.nan, "p99_ms": math.nan, "source": "locust-csv"}
    r = rows[0]

    def num(key):
        try:
            return float(r.get(key, "nan"))
        except ValueError:
            return math.nan

    total, failures = int(num("Request Count")), int(num("Failure Count"))
    rps, fps = num("Requests/s"), num("Failures/s")
    return {"requests": total, "failures": failures, "error_rate": failures / total if total else 1.0,
            "throughput_rps": max(0.0, rps - (fps if not math.isnan(fps) else 0.0)),
            "p50_ms": num("50%"), "p95_ms": num("95%"), "p99_ms": num("99%"), "mean_ms": num("Average Response Time"),
            "max_ms": num("Max Response Time"), "source": "locust-csv"}


# --- SLO verdict ---------------------------------------------------------------------------------------------------

_UPPER_BOUNDS = {"p50_ms": "p50_ms", "p95_ms": "p95_ms", "p99_ms": "p99_ms", "max_error_rate": "error_rate"}
_LOWER_BOUNDS = {"min_throughput_rps": "throughput_rps"}


_QUANTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}


@dataclass(frozen=True)
class SloCheck:
    name: str  # the SLO field, e.g. p95_ms
    measured: float
    target: float
    passed: bool
    samples: int | None = None  # percentiles: the successful requests they come from
    needed: int | None = None  # percentiles: the fewest samples that support them (benchmarks.lib.stats)

    @property
    def supported(self) -> bool:
        """A percentile with enough samples (other SLOs always are)."""
        return self.needed is None or (self.samples or 0) >= self.needed

    @property
    def comparison(self) -> str:
        return ">=" if self.name in _LOWER_BOUNDS else "<="

    def describe(self) -> str:
        if not self.supported:
            return (f"SLO {self.name} NOT SUPPORTED: {self.samples} successful requests, {self.name[:-3]} needs >= "
                    f"{self.needed} (run longer or at a higher rate); measured {_fmt(self.measured)}, target "
                    f"{self.comparison} {_fmt(self.target)}")
        verdict = "met" if self.passed else "MISSED"
        return (f"SLO {self.name} {verdict}: measured {_fmt(self.measured)}, "
                f"target {self.comparison} {_fmt(self.target)}")


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1 else f"{x:.1f}"


def offered_pacing(counters: Sequence[dict]) -> dict:
    """The run's pacing from its Locust processes' counters (`locust_setup.Pacing.counters`): open loop, the offered
    rate and the arrivals due (and late) summed over the processes; else closed."""
    if not counters or counters[0]["mode"] != "open":
        return {"mode": "closed"}
    return {"mode": "open", "offered_rate": sum(c["rate"] for c in counters),
            "arrivals": sum(c["arrivals"] for c in counters), "late": sum(c["late"] for c in counters)}


def sustained_rps(summary: dict) -> float | None:
    """An open loop's throughput at its offered rate: that rate times the share of its schedule's due arrivals
    answered successfully (`summary["pacing"]`: `offered_rate` and `arrivals`, as `offered_pacing` writes them);
    None for a closed loop or a schedule not counted. Successful requests per second would judge the schedule's draw
    as much as the server: a 30-s run at 1.2 arrivals/s draws 36 +- 6, so a server answering every arrival at once
    still measures 1.0/s in one run of six."""
    pacing = summary.get("pacing") or {}
    due, rate = pacing.get("arrivals"), pacing.get("offered_rate")
    if pacing.get("mode") != "open" or not due or not rate:
        return None
    answered = int(summary.get("requests") or 0) - int(summary.get("failures") or 0)
    return float(rate) * min(1.0, answered / due)


def evaluate_slo(slo: Slo, summary: dict) -> list[SloCheck]:
    """One check per gated SLO field; a value that could not be measured (NaN) misses its target, and so does a
    percentile from fewer successful requests (`summary["latency_samples"]`, 0 when absent) than it needs
    (`benchmarks.lib.stats.min_samples`): below that the run's "p99" is its maximum, and the gate would pass or fail
    on one request. The throughput of an open loop is judged at its offered rate (`sustained_rps`), of a closed loop
    as successful requests per second."""
    checks = []
    samples = int(summary.get("latency_samples") or 0)
    sustained = sustained_rps(summary)
    for name, target in slo.targets().items():
        key = _UPPER_BOUNDS.get(name) or _LOWER_BOUNDS[name]
        measured = float(summary.get(key, math.nan))
        if name == "min_throughput_rps" and sustained is not None:
            measured = sustained
        needed = min_samples(_QUANTILES[name]) if name in _QUANTILES else None
        if math.isnan(measured) or (needed is not None and samples < needed):
            passed = False
        elif name in _LOWER_BOUNDS:
            passed = measured >= target
        else:
            passed = measured <= target
        checks.append(SloCheck(name, measured, float(target), passed, samples if needed else None, needed))
    return checks


@dataclass
class Verdict:
    """Outcome of one load test: SLO checks, client summary, per-member server breakdown, where the report is."""

    checks: list[SloCheck]
    summary: dict
    members: list[MemberStats] = field(default_factory=list)
    report_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    scenario: str = ""
    slo_source: str = ""
    cache: CacheShare | None = None  # the route's embedding cache over the run
    provenance: dict = field(default_factory=dict)  # commit, version, digests, Triton, CPU flags, load
    baseline: dict | None = None  # the comparison with a baseline run (loadtest.analysis.compare_runs)

    @property
    def passed(self) -> bool:
        """Every SLO met with enough samples, and not significantly slower than a baseline run when given."""
        slower = bool((self.baseline or {}).get("worse"))
        return bool(self.checks) and all(c.passed for c in self.checks) and not slower

    @property
    def missed(self) -> list[SloCheck]:
        return [c for c in self.checks if not c.passed]

    def slo_table(self) -> str:
        header = f"{'SLO':<20} {'measured':>12} {'target':>14} {'samples':>12}  result"
        lines = [header, "-" * len(header)]
        for c in self.checks:
            count = "" if c.needed is None else f"{c.samples}/{c.needed}"
            result = "pass" if c.passed else ("TOO FEW" if not c.supported else "FAIL")
            lines.append(f"{c.name:<20} {_fmt(c.measured):>12} {c.comparison + ' ' + _fmt(c.target):>14} "
                         f"{count:>12}  {result}")
        return "\n".join(lines)

    def render(self) -> str:
        """What a person reads: the verdict, the SLO table, the per-member breakdown and the report path."""
        s = self.summary
        lines = [f"load test '{self.scenario}' against {s.get('url', '?')}: {s.get('requests', 0)} requests in "
                 f"{s.get('duration_s', 0):.1f}s, {s.get('users', '?')} users, "
                 f"{s.get('mean_candidates', 0):.1f} candidates per request on average",
                 f"throughput {s.get('throughput_rps', 0):.2f} req/s, p50 {_fmt(s.get('p50_ms'))} ms, "
                 f"p95 {_fmt(s.get('p95_ms'))} ms, p99 {_fmt(s.get('p99_ms'))} ms, "
                 f"errors {100 * s.get('error_rate', 0):.2f}%",
                 "", self.slo_table(), ""]
        client = s.get("client") or {}
        if client.get("retries"):
            lines.insert(2, f"the clients retried {client['retries']} attempt(s), {client.get('failovers', 0)} on "
                            f"another endpoint at once")
        if self.members:
            lines += ["server-side breakdown per model (Triton metrics, this run only):",
                      format_members(self.members),
                      "(the route's row is end to end inside the server: its compute is its in-process preprocessing "
                      "plus the wait for its members, whose own rows follow)", ""]
        if self.cache:
            lines += [self.cache.describe(), ""]
        lines += [f"note: {n}" for n in self.notes]
        lines += [c.describe() for c in self.missed]
        if self.baseline:
            lines.append(f"against baseline {self.baseline['baseline']}: "
                         f"{self.baseline.get('describe') or self.baseline.get('note')}")
        lines.append(f"SLO verdict: {'PASS' if self.passed else 'FAIL'} ({self.slo_source})")
        if self.report_dir:
            lines.append(f"report: {self.report_dir}/summary.md (Locust HTML: {self.report_dir}/locust.html)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "scenario": self.scenario, "slo_file": self.slo_source,
                "summary": _json_safe(self.summary),
                "slo": [{"name": c.name, "measured": _json_safe(c.measured), "target": c.target,
                         "comparison": c.comparison, "passed": c.passed, "samples": c.samples, "needed": c.needed,
                         "supported": c.supported} for c in self.checks],
                "members": [m.as_dict() for m in self.members], "notes": self.notes,
                "cache": self.cache.as_dict() if self.cache else None, "provenance": self.provenance,
                "baseline": _json_safe(self.baseline)}


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --- files and plots -----------------------------------------------------------------------------------------------


def write_summary(verdict: Verdict, folder: Path, plots: Sequence[Path] = ()) -> tuple[Path, Path]:
    """`summary.json` and `summary.md` (Markdown tables, the verdict once) in `folder`."""
    folder = Path(folder)
    json_path, md_path = folder / "summary.json", folder / "summary.md"
    json_path.write_text(json.dumps(verdict.as_dict(), indent=2) + "\n")
    md_path.write_text(render_summary_md(verdict, plots))
    return json_path, md_path


def _history(path: Path) -> dict[str, np.ndarray]:
    """Aggregated rows of `<prefix>_stats_history.csv` as columns (NaN where Locust wrote N/A)."""
    cols: dict[str, list[float]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                continue
            for key in ("Timestamp", "User Count", "Requests/s", "Failures/s", "50%", "95%", "99%"):
                try:
                    cols.setdefault(key, []).append(float(row.get(key, "nan")))
                except ValueError:
                    cols.setdefault(key, []).append(math.nan)
    return {k: np.array(v) for k, v in cols.items()}


def write_plots(folder: Path, samples: Samples, history_csv: Path | None) -> list[Path]:
    """PNG plots: latency percentiles over time, latency histogram, throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    hist = _history(history_csv) if history_csv and Path(history_csv).is_file() else {}
    if hist.get("Timestamp") is not None and len(hist["Timestamp"]):
        t = hist["Timestamp"] - hist["Timestamp"][0]
        fig, ax = plt.subplots(figsize=(8, 4))
        for key in ("50%", "95%", "99%"):
            ax.plot(t, hist[key], label=f"p{key.rstrip('%')}")
        ax.set(xlabel="seconds since start", ylabel="latency (ms)",
               title="Latency percentiles over time (Locust's rolling window)")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / "latency_percentiles.png"))
    ok = samples.latency_ms[samples.ok]
    if len(ok):
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.hist(ok, bins=min(60, max(10, len(ok) // 5)), color="tab:blue", alpha=0.8)
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            ax.axvline(np.percentile(ok, q), color="black", linestyle=style, label=f"p{q}")
        ax.set(xlabel="latency per request (ms)", ylabel="requests", title=f"Latency histogram ({len(ok)} requests)")
        ax.legend()
        written.append(_save(fig, folder / "latency_histogram.png"))
    if len(samples):
        t0 = samples.start.min()
        end = samples.start + samples.latency_ms / 1000.0 - t0
        bins = np.arange(0, math.ceil(end.max()) + 1)
        ok_counts, _ = np.histogram(end[samples.ok], bins=bins)
        err_counts, _ = np.histogram(end[~samples.ok], bins=bins)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.step(bins[:-1], ok_counts, where="post", label="successful req/s")
        if err_counts.any():
            ax.plot(bins[:-1], err_counts, label="failed req/s", color="tab:red")
        ax.set(xlabel="seconds since start", ylabel="requests per second", title="Throughput")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / "throughput.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
