"""The fusion ranker: modality embeddings + user history -> click probability and per-modality weights.

User tower: item-id history (left-padded with 0) -> embedding -> LSTM/GRU -> last hidden state.
Every modality embedding is layer-normalised and projected to `projection_dim`, then fused as the spec says:

| fusion | score | modality_weights |
|---|---|---|
| concat (early fusion) | MLP(concat(projections, user)) | occlusion share: |logit - logit without m|, normalised |
| weighted | MLP(sum_m softmax(a)_m * proj_m, user) | the learned softmax weights (same for every row) |
| attention | MLP(sum_m attn_m * value_m, user); attention queried by the user vector | the attention |
| gated (M-way GMU) | MLP(sum_m g_m * proj_m, user); g = softmax_m(W[proj..., user]) per feature | mean of g_m |
| late | mean_m head_m(proj_m, user) | |head_m logit| share |
| two_tower | <item_tower(projections), user_tower(user)> / sqrt(d) + b | occlusion share |

Gated gives every modality and feature its own gate (softmax over modalities), which for M=2 is the gated
multimodal unit's (GMU) A*x + (1-A)*y with A a vector; one scalar gate per modality scored 0.70 AUC against 0.74
for these per-feature gates (docs/evaluation.md). Weights always sum to 1 per row. For concat and two_tower, which
have no weights of their own, the occlusion share is an honest attribution computed in the same graph (one extra
pass per modality with it zeroed).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fusionrank.errors import CheckpointError
from fusionrank.spec import FusionType, Modality, PipelineSpec

# Bump when FusionRanker's parameters change shape or meaning: checkpoints are keyed by it, so old ones are retrained
# instead of failing to load. 2: gated fusion gates every feature, not only every modality.
ARCHITECTURE_VERSION = 2


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


class FusionRanker(nn.Module):
    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        c = config
        self.fusion = FusionType(c.fusion)
        m, p = len(c.dims), c.projection_dim
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in c.dims)
        self.projections = nn.ModuleList(nn.Linear(d, p) for d in c.dims)
        self.item_embedding = nn.Embedding(c.vocab_size, c.embedding_dim, padding_idx=0)
        rnn = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn(c.embedding_dim, c.hidden_size, batch_first=True)
        user = c.hidden_size
        if self.fusion is FusionType.CONCAT:
            self.head = _mlp(m * p + user, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.WEIGHTED:
            self.modality_logits = nn.Parameter(torch.zeros(m))
            self.head = _mlp(p + user, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.ATTENTION:
            self.query = nn.Linear(user, p)
            self.value = nn.Linear(p, p)
            self.head = _mlp(p + user, c.hidden_sizes, c.dropout)
        elif self.fusion is FusionType.GATED:
            self.gate = nn.Linear(m * p + user, m * p)
            self.head = _mlp(p + user, c.hidden_sizes, c.dropout)
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
        """forward(emb_1, ..., emb_M, history) -> (click_probability [B, 1], modality_weights [B, M])."""
        *embeddings, history = inputs
        return self.score(embeddings, self.user_vector(history))

    def score(self, embeddings: list[torch.Tensor], user: torch.Tensor,
              with_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fusion given precomputed user vectors (training runs the user tower once per session, not per row).

        `with_weights=False` skips the occlusion passes of concat/two_tower (training does not need weights)."""
        projected = [proj(norm(e)) for e, norm, proj in zip(embeddings, self.norms, self.projections)]
        m = len(projected)
        if self.fusion in (FusionType.CONCAT, FusionType.TWO_TOWER):
            logit = self._concat_logit(projected, user)
            if m == 1 or not with_weights:
                weights = torch.ones_like(logit) if m == 1 else None
            else:
                deltas = [(logit - self._concat_logit([torch.zeros_like(q) if j == i else q
                                                       for j, q in enumerate(projected)], user)).abs()
                          for i in range(m)]
                weights = _share(torch.cat(deltas, dim=1))
        elif self.fusion is FusionType.LATE:
            logits = torch.cat([head(torch.cat([q, user], dim=1)) for q, head in zip(projected, self.heads)], dim=1)
            logit = logits.mean(dim=1, keepdim=True)
            weights = _share(logits.abs()) if m > 1 else torch.ones_like(logit)
        else:
            tokens = torch.stack(projected, dim=1)  # [B, M, P]
            if self.fusion is FusionType.WEIGHTED:
                weights = torch.softmax(self.modality_logits, dim=0).unsqueeze(0).expand(tokens.shape[0], m)
                fused = (weights.unsqueeze(-1) * tokens).sum(1)
            elif self.fusion is FusionType.ATTENTION:
                scores = (tokens * self.query(user).unsqueeze(1)).sum(-1) / math.sqrt(tokens.shape[-1])
                weights = torch.softmax(scores, dim=1)
                fused = (weights.unsqueeze(-1) * self.value(tokens)).sum(1)
            else:  # gated: a gate per modality and feature, softmax over modalities (GMU's A*x + (1-A)*y for M)
                gates = torch.softmax(self.gate(torch.cat([*projected, user], dim=1)).view(-1, m, tokens.shape[-1]),
                                      dim=1)
                fused = (gates * tokens).sum(1)
                weights = gates.mean(-1)  # each modality's average gate: still sums to 1 per row
            logit = self.head(torch.cat([fused, user], dim=1))
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
