"""`fusionrank evaluate`: every fusion type, its variant trained without modality dropout and every single-modality
baseline on the test users, beside the oracle (the true click probabilities the benchmark was drawn from).

Three tables:
- every metric on complete candidates (the gate: each fused model beats each single-modality baseline on AUC);
- robustness: AUC and NDCG@10 with one modality marked absent for 0 %, 30 % and 100 % of the test candidates
  (the same seeded rows for every model); a single-modality baseline has nothing to score once its own modality
  is gone, so it shows n/a there, and its complete score where another modality is removed;
- video: AUC on the test candidates that are video items (scored from their clip, and from their cover instead)
  and on those that are image items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionrank.contract.spec import FusionType, Modality, PipelineSpec
from fusionrank.model.embeddings import catalogue_embeddings, cover_embeddings
from fusionrank.model.fusion import load_ranker
from fusionrank.model.ranking_metrics import evaluate_scores, ndcg_recall_at_k
from fusionrank.model.synthetic_data import TEST, Benchmark, load_benchmark
from fusionrank.model.train import Rows, checkpoint_path, predict, split_rows, train_ranker, variant_name

COLUMNS = ("auc", "log_loss", "ndcg@10", "recall@10", "precision@0.5", "recall@0.5", "f1@0.5", "coverage@10",
           "diversity@10")
MISSING_RATES = (0.3, 1.0)
COMPLETE = "complete"


def missing_mask(rows: int, modalities: int, column: int, rate: float, seed: int) -> np.ndarray:
    """bool [rows, modalities], all present except `column` absent in round(rate * rows) seeded rows."""
    present = np.ones((rows, modalities), dtype=bool)
    chosen = np.random.default_rng([seed, column]).permutation(rows)[: int(round(rate * rows))]
    present[chosen, column] = False
    return present


def conditions(modalities: tuple[Modality, ...]) -> list[tuple[str, Modality | None, float]]:
    """(label, modality removed, share of candidates): complete first, then each modality at each rate."""
    return [(COMPLETE, None, 0.0)] + [(f"{m.value} {rate:.0%}", m, rate) for m in modalities for rate in MISSING_RATES]


@dataclass
class EvaluationReport:
    rows: list[dict] = field(default_factory=list)  # {"model", "kind": fused|variant|single|oracle, metrics...}
    robustness: list[dict] = field(default_factory=list)  # {"model", "kind", "condition", "auc", "ndcg@10"}
    video: list[dict] = field(default_factory=list)  # {"model", "candidates", "rows", "auc"}
    test_rows: int = 0
    test_users: int = 0

    def by_kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]

    def failures(self) -> list[str]:
        """Fused models that do not beat every single-modality baseline on AUC (complete candidates)."""
        singles = self.by_kind("single")
        if not singles:
            return []
        best = max(singles, key=lambda r: r["auc"])
        return [f"{r['model']} (AUC {r['auc']:.4f}) does not beat {best['model']} (AUC {best['auc']:.4f})"
                for r in self.by_kind("fused") if r["auc"] <= best["auc"]]

    def fused_beats_baselines(self) -> bool:
        return not self.failures()

    def metrics_table(self) -> str:
        head = "| model | kind | " + " | ".join(COLUMNS) + " |"
        lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
        verdict = ("every fused model beats every single-modality baseline (AUC)" if self.fused_beats_baselines()
                   else "NOT every fused model beats the baselines: " + "; ".join(self.failures()))
        return "\n".join([*lines, f"test split: {self.test_rows} candidate rows of {self.test_users} users; {verdict}"])

    def robustness_table(self, metric: str) -> str:
        labels = list(dict.fromkeys(r["condition"] for r in self.robustness))
        models = list(dict.fromkeys(r["model"] for r in self.robustness))
        cell = {(r["model"], r["condition"]): r[metric] for r in self.robustness}
        lines = [f"| {metric} with a modality absent for a share of candidates | " + " | ".join(labels) + " |",
                 "|" + "---|" * (len(labels) + 1)]
        for model in models:
            values = [cell.get((model, c)) for c in labels]
            lines.append(f"| {model} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |")
        return "\n".join(lines)

    def video_table(self) -> str:
        lines = ["| model | candidates | rows | auc |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['candidates']} | {r['rows']} | {r['auc']:.4f} |" for r in self.video]
        return "\n".join(lines)

    def table(self) -> str:
        parts = [self.metrics_table()]
        if self.robustness:
            parts += [self.robustness_table("auc"), self.robustness_table("ndcg@10")]
        if self.video:
            parts.append(self.video_table())
        return "\n\n".join(parts)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": self.rows, "robustness": self.robustness, "video": self.video,
                                    "test_rows": self.test_rows, "test_users": self.test_users,
                                    "fused_beats_baselines": self.fused_beats_baselines()}, indent=2))


@dataclass(frozen=True)
class Variant:
    fusion: FusionType
    modalities: tuple[Modality, ...]
    kind: str  # fused | variant | single
    modality_dropout: bool = True


def _variants(spec: PipelineSpec, fusions: list[str] | None, baselines: bool) -> list[Variant]:
    enabled = spec.modalities.enabled
    chosen = [FusionType(f) for f in (fusions or [f.value for f in FusionType])]
    if len(enabled) == 1:
        return [Variant(f, enabled, "fused") for f in chosen]
    # Each fusion beside its variant trained without modality dropout, then the baselines.
    variants = [v for f in chosen for v in (Variant(f, enabled, "fused"),
                                            Variant(f, enabled, "variant", modality_dropout=False))]
    if baselines:
        variants += [Variant(FusionType.CONCAT, (m,), "single") for m in enabled]
    return variants


def _auc_ndcg(scores: np.ndarray, rows: Rows, subset: np.ndarray | None = None) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    index = slice(None) if subset is None else subset
    ndcg, _ = ndcg_recall_at_k(scores[index], rows.labels[index], rows.users[index])
    return {"auc": float(roc_auc_score(rows.labels[index], scores[index])), "ndcg@10": ndcg}


def _robustness(spec: PipelineSpec, variant: Variant, model, rows: Rows, name: str) -> list[dict]:
    """One model's AUC and NDCG@10 under every condition (None where its own only modality is removed)."""
    enabled = spec.modalities.enabled
    out = []
    for label, removed, rate in conditions(enabled):
        if removed is None or (variant.kind == "single" and removed not in variant.modalities):
            present = None  # nothing it uses is removed: scored as complete
        elif variant.kind == "single":
            continue
        else:
            present = missing_mask(len(rows.labels), len(enabled), enabled.index(removed), rate, spec.data.seed)
        out.append({"model": name, "kind": variant.kind, "condition": label,
                    **_auc_ndcg(predict(model, rows, present), rows)})
    return out


def _video_rows(bench: Benchmark, spec: PipelineSpec, tables, model, name: str, rows: Rows) -> list[dict]:
    """AUC on image items, on video items from their clip, and on the same video items from their cover."""
    is_video = bench.video_items[rows.items]
    if not is_video.any() or is_video.all():
        return []
    covers = dict(tables)
    covers[Modality.IMAGE] = cover_embeddings(spec, bench, tables)
    from_cover = predict(model, split_rows(bench, covers, spec.modalities.enabled, TEST))
    clip = predict(model, rows)
    image_items = np.flatnonzero(~is_video)
    video_items = np.flatnonzero(is_video)
    return [{"model": name, "candidates": "image items", "rows": len(image_items),
             "auc": _auc_ndcg(clip, rows, image_items)["auc"]},
            {"model": name, "candidates": "video items, from their clip", "rows": len(video_items),
             "auc": _auc_ndcg(clip, rows, video_items)["auc"]},
            {"model": name, "candidates": "video items, from their cover", "rows": len(video_items),
             "auc": _auc_ndcg(from_cover, rows, video_items)["auc"]}]


def evaluate_all(spec: PipelineSpec, fusions: list[str] | None = None, baselines: bool = True,
                 progress: bool = True) -> EvaluationReport:
    """Train (or reuse) each variant and score the test users; the oracle rows use the true probabilities."""
    bench = load_benchmark(spec)
    tables = catalogue_embeddings(spec, bench)
    enabled = spec.modalities.enabled
    item_vectors = np.concatenate([t / np.linalg.norm(t, axis=1, keepdims=True).clip(min=1e-12)
                                   for t in tables.values()], axis=1)
    report = EvaluationReport()
    reference = split_rows(bench, tables, enabled, TEST)
    report.test_rows, report.test_users = len(reference.labels), len(np.unique(reference.users))

    def score_row(name, kind, scores):
        metrics = evaluate_scores(scores, reference.labels, reference.users, reference.items, bench.num_items,
                                  item_vectors)
        report.rows.append({"model": name, "kind": kind, **metrics})

    for variant in _variants(spec, fusions, baselines):
        name = variant_name(spec, variant.fusion, variant.modalities, variant.modality_dropout)
        path = checkpoint_path(spec, name)
        if not path.is_file():
            path = train_ranker(spec, fusion=variant.fusion, modalities=variant.modalities, bench=bench,
                                progress=progress, modality_dropout=variant.modality_dropout)
        model = load_ranker(path)
        rows = split_rows(bench, tables, variant.modalities, TEST)
        score_row(name, variant.kind, predict(model, rows))
        report.robustness += _robustness(spec, variant, model, rows, name)
        if variant.kind == "fused":
            report.video += _video_rows(bench, spec, tables, model, name, rows)
    score_row("oracle (true probabilities)", "oracle", reference.true_prob.astype(np.float64))
    score_row("oracle without personal taste", "oracle", reference.population_prob.astype(np.float64))
    return report
