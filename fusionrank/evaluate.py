"""`fusionrank evaluate`: every fusion type and every single-modality baseline on the test users, beside the
oracle (the true click probabilities the benchmark was drawn from)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionrank.benchmark import TEST, load_benchmark
from fusionrank.embeddings import catalogue_embeddings
from fusionrank.metrics import evaluate_scores
from fusionrank.models.fusion import load_ranker
from fusionrank.spec import FusionType, PipelineSpec
from fusionrank.train import checkpoint_path, predict, split_rows, train_ranker, variant_name

COLUMNS = ("auc", "log_loss", "ndcg@10", "recall@10", "precision@0.5", "recall@0.5", "f1@0.5", "coverage@10",
           "diversity@10")


@dataclass
class EvaluationReport:
    rows: list[dict] = field(default_factory=list)  # {"model", "kind": fused|single|oracle, metrics...}
    test_rows: int = 0
    test_users: int = 0

    def by_kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]

    def failures(self) -> list[str]:
        """Fused models that do not beat every single-modality baseline on AUC."""
        singles = self.by_kind("single")
        if not singles:
            return []
        best = max(singles, key=lambda r: r["auc"])
        return [f"{r['model']} (AUC {r['auc']:.4f}) does not beat {best['model']} (AUC {best['auc']:.4f})"
                for r in self.by_kind("fused") if r["auc"] <= best["auc"]]

    def fused_beats_baselines(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        head = "| model | kind | " + " | ".join(COLUMNS) + " |"
        lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
        verdict = ("every fused model beats every single-modality baseline (AUC)" if self.fused_beats_baselines()
                   else "NOT every fused model beats the baselines: " + "; ".join(self.failures()))
        return "\n".join([*lines, f"test split: {self.test_rows} candidate rows of {self.test_users} users; {verdict}"])

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": self.rows, "test_rows": self.test_rows, "test_users": self.test_users,
                                    "fused_beats_baselines": self.fused_beats_baselines()}, indent=2))


def evaluate_all(spec: PipelineSpec, fusions: list[str] | None = None, baselines: bool = True,
                 progress: bool = True) -> EvaluationReport:
    """Train (or reuse) each variant and score the test users; the oracle row uses the true probabilities."""
    bench = load_benchmark(spec)
    tables = catalogue_embeddings(spec, bench)
    enabled = spec.modalities.enabled
    item_vectors = np.concatenate([t / np.linalg.norm(t, axis=1, keepdims=True).clip(min=1e-12)
                                   for t in tables.values()], axis=1)
    variants = [(FusionType(f), enabled, "fused") for f in (fusions or [f.value for f in FusionType])]
    if baselines and len(enabled) > 1:
        variants += [(FusionType.CONCAT, (m,), "single") for m in enabled]

    report = EvaluationReport()
    reference = split_rows(bench, tables, enabled, TEST)
    report.test_rows, report.test_users = len(reference.labels), len(np.unique(reference.users))

    def score_row(name, kind, scores):
        metrics = evaluate_scores(scores, reference.labels, reference.users, reference.items, bench.num_items,
                                  item_vectors)
        report.rows.append({"model": name, "kind": kind, **metrics})

    for fusion, modalities, kind in variants:
        name = variant_name(spec, fusion, modalities)
        path = checkpoint_path(spec, name)
        if not path.is_file():
            path = train_ranker(spec, fusion=fusion, modalities=modalities, bench=bench, progress=progress)
        rows = split_rows(bench, tables, modalities, TEST)
        score_row(name, kind, predict(load_ranker(path), rows))
    score_row("oracle (true probabilities)", "oracle", reference.true_prob.astype(np.float64))
    score_row("oracle without personal taste", "oracle", reference.population_prob.astype(np.float64))
    return report
