"""What `fusionrank tune` leaves: the spec overlay (a `base:` overlay, usable as `--spec` as it is), a Markdown
report (machine, load, every trial, the Pareto front, tuned vs hand-set), a throughput-vs-p99 PNG and the trials as
JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks.tune.search import Trial, TuneError, pareto_front
from fusionrank.contract.spec import PipelineSpec, load_spec


def overlay_file_data(spec_file: Path, overlay: dict) -> dict:
    """The overlay as a spec file: `base:` names the searched spec (absolute), then the changed sections."""
    return {"base": str(Path(spec_file).resolve()), **overlay}


def merged_spec(spec_file: Path, overlay: dict, folder: Path) -> PipelineSpec:
    """The spec the overlay makes, read as `--spec` would read it (checked as every spec is)."""
    path = Path(folder) / "tune.overlay.yaml"
    path.write_text(yaml.safe_dump(overlay_file_data(spec_file, overlay), sort_keys=False))
    return load_spec(path)


def _row(trial: Trial, handset: dict[str, int], mark: str) -> str:
    changes = ", ".join(f"{k}={v}" for k, v in trial.config.items() if handset.get(k) != v) or "hand-set spec"
    rss = "-" if trial.rss_mib is None else f"{trial.rss_mib:.0f}"
    return (f"| {mark} | {changes} | {trial.candidates_per_s:.1f} | {trial.p99_ms:.0f} | {rss} | "
            f"{'yes' if trial.feasible else 'no'} | {trial.seconds:.0f} | {trial.note} |")


def markdown(trials: Sequence[Trial], best: Trial, facts: dict, budget: str, overlay: dict) -> str:
    """The report a person reads."""
    handset = trials[0]
    front = {id(t) for t in pareto_front(trials)}
    lines = ["# fusionrank tune", "",
             f"- machine: {facts['machine']}", f"- load average before / after: {facts['load_before']} / "
             f"{facts['load_after']}", f"- budget: {budget}; {len(trials)} configurations measured",
             f"- stream: {facts['stream']}", f"- SLO: {facts['slo']}", "",
             f"**Tuned vs hand-set capacity within the SLO: {best.candidates_per_s:.1f} vs "
             f"{handset.candidates_per_s:.1f} candidates/s = "
             f"{best.candidates_per_s / handset.candidates_per_s if handset.candidates_per_s else float('nan'):.2f}x**"
             f" (p99 {best.p99_ms:.0f} vs {handset.p99_ms:.0f} ms; first measurement of each)", "",
             f"Confirmation: {facts.get('confirmation', 'none run')}", "",
             f"Open-loop check: {facts.get('open_loop', 'none run')}", "",
             *([f"**Hand-set spec kept: {facts['kept_handset']}.**", ""] if facts.get("kept_handset") else []),
             *([f"**Tuned configuration kept: {facts['kept_tuned']}.**", ""] if facts.get("kept_tuned") else []),
             "| | configuration (changes from the hand-set spec) | candidates/s | p99 ms | RSS MiB "
             "| within SLO and budget | s | notes |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for trial in trials:
        mark = "best" if trial is best else ("front" if id(trial) in front else "")
        lines.append(_row(trial, handset.config, mark))
    lines += ["", "`front`: on the Pareto front of throughput and p99. RSS: the server's processes (tritonserver and "
              "one Python-backend stub per model instance) under load, the server-wide cache's redis-server not "
              "counted.", "", "## Overlay", "", "```yaml",
              yaml.safe_dump(overlay, sort_keys=True).strip() or "{}  # the hand-set spec stays", "```", ""]
    return "\n".join(lines)


def plot(trials: Sequence[Trial], best: Trial, path: Path) -> None:
    """Throughput vs p99 of every trial, the Pareto front joined, hand-set and best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib only where a plot is drawn

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [t for t in trials if t.p99_ms != float("inf")]
    ax.scatter([t.p99_ms for t in ok], [t.candidates_per_s for t in ok],
               c=["tab:green" if t.feasible else "tab:red" for t in ok], label="configurations (red: outside SLO)")
    front = pareto_front(trials)
    ax.plot([t.p99_ms for t in front], [t.candidates_per_s for t in front], "k--o", lw=1, mfc="none", ms=12,
            label="Pareto front")
    for trial, text in ((trials[0], "hand-set"), (best, "tuned")):
        ax.annotate(text, (trial.p99_ms, trial.candidates_per_s), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("p99 latency per request (ms)")
    ax.set_ylabel("candidates/s")
    ax.set_title("fusionrank tune: throughput vs p99")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, spec_file: Path, trials: Sequence[Trial], best: Trial, overlay: dict,
                 facts: dict, budget: str) -> dict[str, Path]:
    """Every file of the report; TuneError (nothing written) when the overlay does not make a valid spec."""
    if not best.feasible:
        raise TuneError(f"refusing the overlay: its configuration did not meet the SLO or the ranking gates "
                        f"({best.note})")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"overlay": out_dir / "tune.overlay.yaml", "report": out_dir / "tune.md", "plot": out_dir / "tune.png",
             "json": out_dir / "tune.json"}
    try:
        merged_spec(spec_file, overlay, out_dir)  # written and read back: a spec that does not load is refused
    except Exception:
        paths["overlay"].unlink(missing_ok=True)
        raise
    paths["report"].write_text(markdown(trials, best, facts, budget, overlay))
    plot(trials, best, paths["plot"])
    paths["json"].write_text(json.dumps({"facts": facts, "budget": budget, "overlay": overlay,
                                         "trials": [t.__dict__ for t in trials]}, indent=2, default=str))
    return paths
