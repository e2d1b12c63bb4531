"""Ranking and classification metrics (AUC, log-loss, NDCG/recall@10, P/R/F1, coverage, diversity) of the test users.

Ranking metrics are per user over the pool of all candidates the user was shown in the test split (so top-10 is a
real choice, not the whole 10-candidate session), then averaged over users with at least one click.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, log_loss, precision_score, recall_score, roc_auc_score

K = 10


def _groups(users: np.ndarray):
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    return np.split(order, bounds)


def ndcg_recall_at_k(scores: np.ndarray, labels: np.ndarray, users: np.ndarray, k: int = K) -> tuple[float, float]:
    ndcgs, recalls = [], []
    discounts = 1 / np.log2(np.arange(2, k + 2))
    for rows in _groups(users):
        rel = labels[rows]
        if rel.sum() == 0:
            continue
        top = np.argsort(-scores[rows], kind="stable")[:k]
        dcg = float((rel[top] * discounts[: len(top)]).sum())
        ideal = float((np.sort(rel)[::-1][:k] * discounts[: min(k, len(rel))]).sum())
        ndcgs.append(dcg / ideal)
        recalls.append(float(rel[top].sum() / rel.sum()))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def top_k_lists(scores: np.ndarray, items: np.ndarray, users: np.ndarray, k: int = K) -> list[np.ndarray]:
    return [items[rows][np.argsort(-scores[rows], kind="stable")[:k]] for rows in _groups(users)]


def coverage(lists: list[np.ndarray], num_items: int) -> float:
    """Share of the catalogue that appears in at least one user's top-k."""
    return len(set(np.concatenate(lists).tolist())) / num_items


def intra_list_diversity(lists: list[np.ndarray], item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance between the items of each top-k list (item content vectors), over users."""
    unit = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True).clip(min=1e-12)
    values = []
    for items in lists:
        v = unit[items]
        n = len(v)
        if n < 2:
            continue
        sim = v @ v.T
        values.append(float((1 - sim[np.triu_indices(n, 1)]).mean()))
    return float(np.mean(values))


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, users: np.ndarray, items: np.ndarray, num_items: int,
                    item_vectors: np.ndarray) -> dict[str, float]:
    predicted = (scores >= 0.5).astype(int)
    ndcg, recall = ndcg_recall_at_k(scores, labels, users)
    lists = top_k_lists(scores, items, users)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "log_loss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7))),
        f"ndcg@{K}": ndcg,
        f"recall@{K}": recall,
        "precision@0.5": float(precision_score(labels, predicted, zero_division=0)),
        "recall@0.5": float(recall_score(labels, predicted, zero_division=0)),
        "f1@0.5": float(f1_score(labels, predicted, zero_division=0)),
        "coverage@10": coverage(lists, num_items),
        "diversity@10": intra_list_diversity(lists, item_vectors),
    }
