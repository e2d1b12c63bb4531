"""The fusion ranker: modality embeddings + user history + presence mask -> click probability and modality weights.

User tower: item-id history (left-padded with 0) -> embedding -> LSTM/GRU -> last hidden state.
Every modality embedding is layer-normalised and projected to `projection_dim`, then fused as the spec says:

| fusion | score | modality_weights |
|---|---|---|
| concat (early fusion) | MLP(concat(projections, user)) | occlusion share: |logit - logit with m absent|, normalised |
| weighted | MLP(sum_m softmax(a)_m * proj_m, user, mask) | the learned softmax weights, over present modalities |
| attention | MLP(sum_m attn_m * value_m, user, mask); attention queried by the user vector | the attention |
| gated (M-way GMU) | MLP(sum_m g_m * proj_m, user, mask); g = softmax_m(W[proj..., user]) per feature | mean of g_m |
| late | mean over present m of head_m(proj_m, user) | |head_m logit| share |
| two_tower | <item_tower(projections), user_tower(user)> / sqrt(d) + b | occlusion share |

Absent modalities (`modality_mask` 0, see `fusionrank.contract.tensors`): concat, two_tower and gated put a learned
"missing" vector (one per modality, trained by modality dropout, `train.modality_dropout`) where the projection would
be; weighted, attention and gated take the absent modality out of their softmax, late out of its mean, and the heads
of weighted, attention and gated also see the mask (which modalities exist shifts the click rate they should
predict). Every fusion gives an absent modality a weight of exactly 0, and the present ones still sum to 1. A row
with no modality present is invalid input (the preprocessing rejects it); the graph still returns finite values
for it (weights all 0), so Triton's zero-filled warm-up runs.

Gated gives every modality and feature its own gate (softmax over modalities), which for M=2 is the gated
multimodal unit's (GMU) A*x + (1-A)*y with A a vector; one scalar gate per modality scored 0.70 AUC against 0.74
for these per-feature gates (docs/evaluation.md). For concat and two_tower, which have no weights of their own, the
occlusion share is an honest attribution computed in the same graph (one extra pass per modality with it marked
absent).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fusionrank.contract.errors import CheckpointError
from fusionrank.contract.spec import FusionType, Modality, PipelineSpec

# Bump when FusionRanker's parameters change shape or meaning: checkpoints are keyed by it, so old ones are retrained
# instead of failing to load. 2: gated fusion gates every feature, not only every modality. 3: presence mask input,
# learned missing-modality vectors, mask-aware heads (weighted, attention, gated).
ARCHITECTURE_VERSION = 3


@dataclass(frozen=True)
class RankerConfig:
    fusion: str
    modalities: tuple[str, ...]
    dims: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    projection_dim: int
    dropout: float
    vocab_size: int
    history_length: int
    embedding_dim: int
    cell: str
    hidden_size: int

    @classmethod
    def from_spec(cls, spec: PipelineSpec, fusion: FusionType | None = None,
                  modalities: tuple[Modality, ...] | None = None) -> RankerConfig:
        r, h = spec.ranker, spec.ranker.history
        modalities = modalities or spec.modalities.enabled
        return cls(fusion=(fusion or r.fusion).value, modalities=tuple(m.value for m in modalities),
                   dims=tuple(spec.modalities.embedding_dim(m) for m in modalities), hidden_sizes=r.hidden_sizes,
                   projection_dim=r.projection_dim, dropout=r.dropout, vocab_size=h.vocab_size,
                   history_length=h.length, embedding_dim=h.embedding_dim, cell=h.cell.value, hidden_size=h.hidden_size)


def _mlp(in_dim: int, hidden: tuple[int, ...], dropout: float, out_dim: int = 1) -> nn.Sequential:
    layers = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = size
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


def _share(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes / magnitudes.sum(dim=1, keepdim=True).clamp(min=1e-12)


def masked_softmax(logits: torch.Tensor, present: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the present entries only: absent ones get exactly 0, present ones sum to 1 (all absent: all 0).

    Absent logits never reach exp(): they are replaced by 0 before it and multiplied out after, so neither an
    overflow nor a NaN gradient can come from a row's absent entries."""
    masked_max = torch.where(present, logits, torch.full_like(logits, float("-inf"))).amax(dim, keepdim=True)
    shifted = torch.where(present, logits - masked_max, torch.zeros_like(logits))
    exps = shifted.exp() * present.to(logits.dtype)
    return exps / exps.sum(dim, keepdim=True).clamp(min=1e-30)


class FusionRanker(nn.Module):
    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        c = config
        self.fusion = FusionType(c.fusion)
        m, p = len(c.dims), c.projection_dim
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in c.dims)
        self.projections = nn.ModuleList(nn.Linear(d, p) for d in c.dims)
        # Stands in for an absent modality's projection. Zeros at init: a ranker trained without modality dropout
        # never updates it, so it scores an absent modality as a zero projection (the plain imputation baseline).
        self.missing = nn.Parameter(torch.zeros(m, p))
        self.item_embedding = nn.Embedding(c.vocab_size, c.embedding_dim, padding_idx=0)
        rnn = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn(c.embedding_dim, c.hidden_size, batch_first=True)
        user = c.hidden_size
        if self.fusion is FusionType.CONCAT:
            self.head = _mlp(m * p + user, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.WEIGHTED:
            self.modality_logits = nn.Parameter(torch.zeros(m))
            self.head = _mlp(p + user + m, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.ATTENTION:
            self.query = nn.Linear(user, p)
            self.value = nn.Linear(p, p)
            self.head = _mlp(p + user + m, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.GATED:
            self.gate = nn.Linear(m * p + user, m * p)
            self.head = _mlp(p + user + m, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.LATE:
            self.heads = nn.ModuleList(_mlp(p + user, c.hidden_sizes, c.dropout) for _ in c.dims)
        else:  # two_tower
            self.item_tower = _mlp(m * p, c.hidden_sizes, c.dropout, out_dim=p)
            self.user_tower = _mlp(user, c.hidden_sizes, c.dropout, out_dim=p)
            self.bias = nn.Parameter(torch.zeros(1))

    def user_vector(self, history: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.item_embedding(history))
        return out[:, -1]  # left-padded: the last step has seen the most recent item

    def _concat_logit(self, projected: list[torch.Tensor], user: torch.Tensor) -> torch.Tensor:
        if self.fusion is FusionType.CONCAT:
            return self.head(torch.cat([*projected, user], dim=1))
        item = self.item_tower(torch.cat(projected, dim=1))
        return (item * self.user_tower(user)).sum(1, keepdim=True) / math.sqrt(item.shape[1]) + self.bias

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(emb_1, ..., emb_M, history[, modality_mask]) -> (click_probability [B, 1], modality_weights
        [B, M]); without a mask every modality is present."""
        m = len(self.config.dims)
        embeddings, history = list(inputs[:m]), inputs[m]
        mask = inputs[m + 1] if len(inputs) > m + 1 else None
        return self.score(embeddings, self.user_vector(history), mask)

    def _occlusion_weights(self, projected, absent, user, logit, present) -> torch.Tensor:
        """|logit - logit with modality i marked absent|, shared out; exactly 0 for an absent modality."""
        deltas = [(logit - self._concat_logit([absent[j] if j == i else q for j, q in enumerate(projected)],
                                              user)).abs() * present[:, i:i + 1].to(logit.dtype)
                  for i in range(len(projected))]
        return _share(torch.cat(deltas, dim=1))

    def score(self, embeddings: list[torch.Tensor], user: torch.Tensor, mask: torch.Tensor | None = None,
              with_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fusion given precomputed user vectors (training runs the user tower once per session, not per row).

        `mask` [B, M] (1 present, 0 absent; None: all present). `with_weights=False` skips the occlusion passes of
        concat/two_tower (training does not need weights)."""
        m = len(embeddings)
        if mask is None:
            mask = torch.ones(embeddings[0].shape[0], m, dtype=embeddings[0].dtype)
        present = mask > 0.5
        absent = [self.missing[i].unsqueeze(0).expand(e.shape[0], -1) for i, e in enumerate(embeddings)]
        # torch.where, not a product with the mask: an absent row's embedding may hold anything, even NaN.
        projected = [torch.where(present[:, i:i + 1], proj(norm(e)), absent[i])
                     for i, (e, norm, proj) in enumerate(zip(embeddings, self.norms, self.projections))]
        if self.fusion in (FusionType.CONCAT, FusionType.TWO_TOWER):
            logit = self._concat_logit(projected, user)
            weights = None
            if m == 1:
                weights = present.to(logit.dtype)
            elif with_weights:
                weights = self._occlusion_weights(projected, absent, user, logit, present)
        elif self.fusion is FusionType.LATE:
            logits = torch.cat([head(torch.cat([q, user], dim=1)) for q, head in zip(projected, self.heads)], dim=1)
            kept = present.to(logits.dtype)
            logit = (logits * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1.0)
            weights = _share(logits.abs() * kept)
        else:
            tokens = torch.stack(projected, dim=1)  # [B, M, P]
            if self.fusion is FusionType.WEIGHTED:
                weights = masked_softmax(self.modality_logits.unsqueeze(0).expand(tokens.shape[0], m), present, 1)
                fused = (weights.unsqueeze(-1) * tokens).sum(1)
            elif self.fusion is FusionType.ATTENTION:
                scores = (tokens * self.query(user).unsqueeze(1)).sum(-1) / math.sqrt(tokens.shape[-1])
                weights = masked_softmax(scores, present, 1)
                fused = (weights.unsqueeze(-1) * self.value(tokens)).sum(1)
            else:  # gated: a gate per modality and feature, softmax over modalities (GMU's A*x + (1-A)*y for M)
                gates = masked_softmax(self.gate(torch.cat([*projected, user], dim=1)).view(-1, m, tokens.shape[-1]),
                                       present.unsqueeze(-1), 1)
                fused = (gates * tokens).sum(1)
                weights = gates.mean(-1)  # each modality's average gate: still sums to 1 per row
            logit = self.head(torch.cat([fused, user, mask.to(fused.dtype)], dim=1))
        return torch.sigmoid(logit), weights


def save_ranker(model: FusionRanker, path: Path, metrics: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
                "metrics": metrics or {}}, tmp)
    tmp.replace(path)
    return path


def load_ranker(path: Path, spec: PipelineSpec | None = None) -> FusionRanker:
    """A trained ranker in eval mode; with `spec`, checks it matches the spec's modalities and history."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ranker checkpoint {path} does not exist; run `fusionrank train` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        config = RankerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()})
        model = FusionRanker(config)
        model.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"ranker checkpoint {path} cannot be loaded: {exc}") from None
    if spec is not None:
        expected = RankerConfig.from_spec(spec, fusion=FusionType(config.fusion))
        if (config.modalities, config.dims, config.vocab_size, config.history_length) != (
                expected.modalities, expected.dims, expected.vocab_size, expected.history_length):
            raise CheckpointError(f"ranker checkpoint {path} was trained for modalities {config.modalities} dims "
                                  f"{config.dims}, vocab {config.vocab_size}, history {config.history_length}; the "
                                  f"spec wants {expected.modalities} {expected.dims}, {expected.vocab_size}, "
                                  f"{expected.history_length}")
    return model.eval()
