"""Parity checks shared by every export step (ONNX Runtime vs PyTorch, TensorRT vs golden outputs).

Tensor parity: per output, |actual - reference| <= atol + rtol * |reference| element-wise (numpy's allclose rule),
else a `ParityError` naming the model, the output, the max difference and the tolerance.
Ranking parity on a frozen candidate set: top-10 overlap per user, Kendall tau over all candidates and the AUC
difference against the clicks, gated by the spec's `export.ranking`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from fusionrank.contract.errors import ParityError
from fusionrank.contract.spec import RankingParitySpec, Tolerance


@dataclass(frozen=True)
class OutputParity:
    model: str
    output: str
    max_abs_diff: float
    tolerance: Tolerance
    passed: bool
    shape: tuple[int, ...] = ()
    inputs: str = ""  # what was fed, for the table (e.g. "input_ids [16, 32]")

    @property
    def samples(self) -> int:
        return self.shape[0] if self.shape else 0

    def as_dict(self) -> dict:
        return {"model": self.model, "output": self.output, "max_abs_diff": self.max_abs_diff,
                "atol": self.tolerance.atol, "rtol": self.tolerance.rtol, "passed": self.passed,
                "shape": list(self.shape), "inputs": self.inputs}


def check_outputs(model: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                  tolerance_for: Callable[[str], Tolerance], raise_on_fail: bool = True) -> list[OutputParity]:
    """Compare every reference output with the actual one; raises ParityError on the first failure if asked."""
    results = []
    for name, ref in reference.items():
        tol = tolerance_for(name)
        if name not in actual:
            result = OutputParity(model, name, float("inf"), tol, False)
        else:
            ref64, act64 = np.asarray(ref, dtype=np.float64), np.asarray(actual[name], dtype=np.float64)
            if ref64.shape != act64.shape or not np.isfinite(act64).all():
                result = OutputParity(model, name, float("inf"), tol, False, ref64.shape)
            else:
                diff = np.abs(act64 - ref64)
                passed = bool((diff <= tol.atol + tol.rtol * np.abs(ref64)).all())
                result = OutputParity(model, name, float(diff.max(initial=0.0)), tol, passed, ref64.shape)
        if raise_on_fail and not result.passed:
            raise ParityError(model, name, result.max_abs_diff, tol.describe())
        results.append(result)
    return results


@dataclass(frozen=True)
class RankingParity:
    top10_overlap: float
    kendall_tau: float
    auc_reference: float
    auc_actual: float
    auc_diff: float
    passed: bool
    candidates: int

    def as_dict(self) -> dict:
        return asdict(self)


def ranking_parity(reference_scores: np.ndarray, actual_scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                   gate: RankingParitySpec, model: str = "pipeline", raise_on_fail: bool = False) -> RankingParity:
    """Do the exported scores rank the frozen candidate set like the reference does?"""
    from scipy.stats import kendalltau
    from sklearn.metrics import roc_auc_score

    ref, act = np.asarray(reference_scores, np.float64).ravel(), np.asarray(actual_scores, np.float64).ravel()
    labels, groups = np.asarray(labels).ravel(), np.asarray(groups).ravel()
    overlaps = []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        k = min(10, len(rows))
        top_ref = set(rows[np.argsort(-ref[rows], kind="stable")[:k]].tolist())
        top_act = set(rows[np.argsort(-act[rows], kind="stable")[:k]].tolist())
        overlaps.append(len(top_ref & top_act) / k)
    tau = float(kendalltau(ref, act).statistic) if len(ref) > 1 else 1.0
    both_classes = 0 < labels.sum() < len(labels)
    auc_ref = float(roc_auc_score(labels, ref)) if both_classes else float("nan")
    auc_act = float(roc_auc_score(labels, act)) if both_classes else float("nan")
    auc_diff = abs(auc_ref - auc_act) if both_classes else 0.0
    overlap = float(np.mean(overlaps))
    checks = {"top10_overlap": (overlap, f">= {gate.min_top10_overlap}", overlap >= gate.min_top10_overlap),
              "kendall_tau": (tau, f">= {gate.min_kendall_tau}", tau >= gate.min_kendall_tau),
              "auc_diff": (auc_diff, f"<= {gate.max_auc_diff}", auc_diff <= gate.max_auc_diff)}
    passed = all(ok for _, _, ok in checks.values())
    if raise_on_fail and not passed:
        name, (value, wanted, _) = next((k, v) for k, v in checks.items() if not v[2])
        raise ParityError(model, f"ranking {name}", value, f"the gate {name} {wanted}")
    return RankingParity(overlap, tau, auc_ref, auc_act, auc_diff, passed, len(ref))
