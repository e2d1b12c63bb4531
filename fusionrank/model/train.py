"""`fusionrank train`: the fusion ranker on frozen-encoder embeddings of the benchmark catalogue.

Training rows are (session, candidate) pairs of training users; the validation users pick the best epoch (by
AUC on complete candidates). Modality dropout (`train.modality_dropout`) marks each modality of each training row
absent with that probability, keeping at least one per row, so the ranker learns to score candidates that lack a
modality (see `fusionrank.model.fusion`). A run takes seconds to a few minutes on 2 CPU cores and writes a
checkpoint keyed by the spec's digest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import FusionType, Modality, PipelineSpec
from fusionrank.model.embeddings import catalogue_embeddings
from fusionrank.model.fusion import ARCHITECTURE_VERSION, FusionRanker, RankerConfig, save_ranker
from fusionrank.model.synthetic_data import TRAIN, VAL, Benchmark, data_key, load_benchmark
from fusionrank.preprocess import PREPROCESS_VERSION

log = logging.getLogger(__name__)


NO_DROPOUT_SUFFIX = "_no_dropout"


def variant_name(spec: PipelineSpec, fusion: FusionType | None = None,
                 modalities: tuple[Modality, ...] | None = None, modality_dropout: bool = True) -> str:
    """Checkpoint name: the fusion type for the full model, e.g. `text_only` for a single-modality baseline and
    `concat_no_dropout` for the full model trained on complete candidates only."""
    if modalities and tuple(modalities) != spec.modalities.enabled:
        return "+".join(m.value for m in modalities) + "_only"
    return (fusion or spec.ranker.fusion).value + ("" if modality_dropout else NO_DROPOUT_SUFFIX)


def checkpoint_path(spec: PipelineSpec, name: str) -> Path:
    """Ranker checkpoint of one trained variant (e.g. 'concat', 'text_only'), keyed by the spec's digest, the
    generated data's key, the ranker's architecture version and the preprocessing version (a new data generator,
    architecture or preprocessing invalidates checkpoints trained before it)."""
    key = f"{spec.digest()}-{data_key(spec)}-a{ARCHITECTURE_VERSION}-p{PREPROCESS_VERSION}"
    return cache_dir(spec) / "checkpoints" / key / f"ranker-{name}.pt"


@dataclass
class Rows:
    """Flattened (session, candidate) rows of one split."""

    embeddings: list[np.ndarray]
    history: np.ndarray
    labels: np.ndarray
    true_prob: np.ndarray
    population_prob: np.ndarray
    sessions: np.ndarray
    users: np.ndarray
    items: np.ndarray

    def tensors(self, index=slice(None)) -> list[torch.Tensor]:
        return [*(torch.from_numpy(e[index]) for e in self.embeddings), torch.from_numpy(self.history[index])]


def split_rows(bench: Benchmark, tables: dict[Modality, np.ndarray], modalities: tuple[Modality, ...],
               split: int | np.ndarray) -> Rows:
    s = bench.sessions
    sessions = bench.split_sessions(split) if np.isscalar(split) else np.asarray(split)
    cands = s.candidates[sessions]
    per = cands.shape[1]
    items = cands.ravel()
    return Rows(embeddings=[tables[m][items] for m in modalities],
                history=np.repeat(s.history[sessions], per, axis=0),
                labels=s.clicks[sessions].ravel().astype(np.float32),
                true_prob=s.true_prob[sessions].ravel(), population_prob=s.population_prob[sessions].ravel(),
                sessions=np.repeat(sessions, per), users=np.repeat(s.user[sessions], per), items=items)


@torch.inference_mode()
def predict(model, rows: Rows, present: np.ndarray | None = None) -> np.ndarray:
    """Click probabilities of every row (`present` [rows, M] bool: which modalities each row has; None: all); the
    user tower runs once per session (rows of a session share history)."""
    model.eval()
    sessions, first, inverse = np.unique(rows.sessions, return_index=True, return_inverse=True)
    user = model.user_vector(torch.from_numpy(rows.history[first]))[torch.from_numpy(inverse.ravel())]
    mask = None if present is None else torch.from_numpy(np.asarray(present, dtype=np.float32))
    probs, _ = model.score([torch.from_numpy(e) for e in rows.embeddings], user, mask, with_weights=False)
    return probs[:, 0].numpy()


def dropout_mask(rng: np.random.Generator, rows: int, modalities: int, rate: float) -> np.ndarray:
    """float32 [rows, modalities]: each entry 0 (absent) with probability `rate`; a row that lost every modality
    gets one back, chosen uniformly, so no training row is empty (an empty candidate is invalid input)."""
    keep = rng.random((rows, modalities)) >= rate
    empty = np.flatnonzero(~keep.any(axis=1))
    keep[empty, rng.integers(0, modalities, size=len(empty))] = True
    return keep.astype(np.float32)


def train_ranker(spec: PipelineSpec, fusion: FusionType | None = None, modalities: tuple[Modality, ...] | None = None,
                 bench: Benchmark | None = None, progress: bool = True, modality_dropout: bool = True) -> Path:
    """Train one ranker variant and return its checkpoint path (`modality_dropout=False`: on complete candidates
    only, the variant the evaluation compares against)."""
    from sklearn.metrics import roc_auc_score

    fusion = fusion or spec.ranker.fusion
    modalities = tuple(modalities or spec.modalities.enabled)
    name = variant_name(spec, fusion, modalities, modality_dropout)
    # One modality alone cannot be dropped: a single-modality baseline always trains on complete rows.
    drop_rate = spec.train.modality_dropout if modality_dropout and len(modalities) > 1 else 0.0
    bench = bench or load_benchmark(spec)
    tables = catalogue_embeddings(spec, bench)
    train, val = split_rows(bench, tables, modalities, TRAIN), split_rows(bench, tables, modalities, VAL)

    t = spec.train
    torch.manual_seed(t.seed)
    model = FusionRanker(RankerConfig.from_spec(spec, fusion=fusion, modalities=modalities))
    optimiser = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    loss_fn = torch.nn.BCELoss()
    rng = np.random.default_rng(t.seed)
    drop_rng = np.random.default_rng([t.seed, 14])  # its own stream: the batch order does not depend on the rate
    per = bench.sessions.candidates.shape[1]
    n_sessions = len(train.labels) // per
    sessions_per_batch = max(1, t.batch_size // per)
    history = torch.from_numpy(train.history[::per])  # one row per session (its candidates share it)
    embeddings = [torch.from_numpy(e) for e in train.embeddings]
    labels = torch.from_numpy(train.labels)
    best = (-1.0, None, 0)
    bar = tqdm(range(t.epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = rng.permutation(n_sessions)
        total = 0.0
        for start in range(0, n_sessions, sessions_per_batch):
            # Batches are whole sessions: the user tower runs once per session, not once per candidate row.
            batch = torch.from_numpy(order[start:start + sessions_per_batch])
            rows = (batch[:, None] * per + torch.arange(per)).reshape(-1)
            user = model.user_vector(history[batch]).repeat_interleave(per, dim=0)
            mask = torch.from_numpy(dropout_mask(drop_rng, len(rows), len(modalities), drop_rate)) if drop_rate \
                else None
            probs, _ = model.score([e[rows] for e in embeddings], user, mask, with_weights=False)
            loss = loss_fn(probs[:, 0].clamp(1e-7, 1 - 1e-7), labels[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(rows)
        val_auc = float(roc_auc_score(val.labels, predict(model, val)))
        bar.set_postfix(loss=f"{total / len(train.labels):.4f}", val_auc=f"{val_auc:.4f}")
        if val_auc > best[0]:
            best = (val_auc, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    path = save_ranker(model, checkpoint_path(spec, name), metrics={"val_auc": best[0], "best_epoch": best[2],
                                                                    "modality_dropout": drop_rate})
    log.info("trained %s: best val AUC %.4f at epoch %d -> %s", name, best[0], best[2], path)
    return path
