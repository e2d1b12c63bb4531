"""What a load test's per-request samples say beyond the SLO table: the load actually delivered (rate and
inter-arrival times against the offered Poisson rate), the comparison with a baseline run (the measurement core's
significance test on time windows), and what produced the figures (provenance)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks.lib import compare_samples, min_repeats, provenance
from fusionrank.contract.spec import PipelineSpec
from loadtest.report import offered_pacing, read_samples

BASELINE_WINDOWS = 10  # a run's samples are cut into this many time windows; their medians are the repeats


def pacing_summary(samples_dir: Path, samples) -> dict:
    """Offered vs delivered: the Locust processes' pacing counters (open loop: rate, arrivals, late) and, from the
    samples, the delivered rate and the inter-arrival times' mean, coefficient of variation (1 for exponential gaps)
    and a Kolmogorov-Smirnov test against the exponential law at the delivered rate."""
    out = offered_pacing([json.loads(p.read_text()) for p in Path(samples_dir).glob("pacing-*.json")])
    starts = np.sort(samples.start) if len(samples) else np.zeros(0)
    if len(starts) >= 3:
        gaps = np.diff(starts)
        rate = (len(starts) - 1) / (starts[-1] - starts[0]) if starts[-1] > starts[0] else 0.0
        out.update(delivered_rate=rate, mean_gap_s=float(gaps.mean()),
                   gap_cv=float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else math.nan)
        if rate > 0:
            from scipy.stats import kstest  # scipy: heavy, only when there are gaps to test

            out["exponential_ks_p"] = float(kstest(gaps, "expon", args=(0, 1 / rate)).pvalue)
        if out["mode"] == "open" and out.get("offered_rate"):
            out["delivered_vs_offered"] = rate / out["offered_rate"] - 1.0
            # a Poisson count over the run varies by 1/sqrt(n) around the offered rate itself: the schedule drawn
            # is what the client could deliver; sent / due says how much of it it did
            out["sent_vs_due"] = len(starts) / out["arrivals"] - 1.0 if out.get("arrivals") else None
    return out


def window_medians(samples, windows: int = BASELINE_WINDOWS) -> list[float]:
    """Median latency (ms) of the successful requests in each of `windows` equal time windows of the run."""
    ok = samples.ok
    if ok.sum() < windows:
        return []
    start, lat = samples.start[ok], samples.latency_ms[ok]
    edges = np.linspace(start.min(), start.max() + 1e-9, windows + 1)
    index = np.clip(np.searchsorted(edges, start, side="right") - 1, 0, windows - 1)
    return [float(np.median(lat[index == w])) for w in range(windows) if (index == w).any()]


def compare_runs(baseline_dir: Path, samples, noise_floor: float) -> dict:
    """This run against a baseline run's report folder: window medians of both, Mann-Whitney U with a noise floor
    (the spec's `upgrade.max_latency_regression`, the upgrade report's rule)."""
    folder = Path(baseline_dir)
    folder = folder.parent if folder.name == "summary.json" else folder
    base = read_samples(folder / "samples")
    old, new = window_medians(base), window_medians(samples)
    result = {"baseline": str(folder), "windows": BASELINE_WINDOWS, "baseline_requests": len(base)}
    if min(len(old), len(new)) < min_repeats():
        result["note"] = (f"not compared: {len(base)} baseline / {len(samples)} current samples give "
                          f"{len(old)} / {len(new)} windows (needs >= {min_repeats()} each)")
        return result
    cmp_ = compare_samples(old, new, noise_floor=noise_floor)
    result.update(cmp_.as_dict(), describe=cmp_.describe())
    return result


def run_provenance(spec: PipelineSpec, url: str, repository: Path | None) -> dict:
    """Commit, version, spec digest, CPU model and flags, load average; the served files' digests when the
    repository is local; the server's Triton version when it answers."""
    files = []
    if repository is not None:
        from export.verify.served_files import served_files  # the CPU profile's files, named by the rendered configs

        files = [f.path for f in served_files(spec, repository).values()]
    return provenance(spec.digest(), files, root=repository, triton=_server_version(url))


def _server_version(url: str) -> str | None:
    try:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(url.split(",")[0].strip()) as client:
            meta = client.get_server_metadata(client_timeout=2.0)
            return f"{meta.name} {meta.version}"
    except Exception:  # provenance is best effort: a server without metadata still gets load-tested
        return None


def write_arrival_plot(folder: Path, samples, pacing: dict) -> list[Path]:
    """`inter_arrival.png`: histogram of the gaps between request starts, with the exponential density at the
    delivered rate (an open loop's arrivals should follow it)."""
    if len(samples) < 3:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps_ms = np.diff(np.sort(samples.start)) * 1000.0
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(gaps_ms, bins=min(60, max(10, len(gaps_ms) // 10)), density=True, alpha=0.7, label="measured")
    rate = pacing.get("delivered_rate") or 0.0
    if rate > 0:
        x = np.linspace(0, gaps_ms.max(), 200)
        ax.plot(x, rate / 1000.0 * np.exp(-rate / 1000.0 * x), color="black", label=f"exponential, {rate:.2f}/s")
    offered = f", offered {pacing['offered_rate']:.2f}/s" if pacing.get("offered_rate") else ""
    ax.set(xlabel="gap between request starts (ms)", ylabel="density",
           title=f"Inter-arrival times ({pacing.get('mode', '?')} loop{offered})")
    ax.legend()
    fig.tight_layout()
    path = Path(folder) / "inter_arrival.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
