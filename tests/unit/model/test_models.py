"""Reference models: encoders' shapes and pooling, every fusion's outputs (complete and with absent modalities),
checkpoint round trip and mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusionrank.contract.errors import CheckpointError
from fusionrank.contract.spec import FusionType, Modality, from_dict, to_dict
from fusionrank.model.encoders import build_encoder
from fusionrank.model.fusion import FusionRanker, RankerConfig, load_ranker, masked_softmax, save_ranker
from fusionrank.model.train import dropout_mask
from fusionrank.request.candidates import presence_patterns


def _inputs(spec, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    embs = [torch.randn(n, spec.modalities.embedding_dim(m), generator=g) for m in spec.modalities.enabled]
    history = torch.randint(0, spec.ranker.history.vocab_size, (n, spec.ranker.history.length), generator=g)
    return embs, history


@pytest.mark.parametrize("fusion", list(FusionType))
def test_every_fusion_outputs_probabilities_and_weights(ci_spec, fusion):
    model = FusionRanker(RankerConfig.from_spec(ci_spec, fusion=fusion)).eval()
    embs, history = _inputs(ci_spec)
    probs, weights = model(*embs, history)
    assert probs.shape == (6, 1) and ((probs > 0) & (probs < 1)).all()
    assert weights.shape == (6, 3) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    # Row-independent: scoring one candidate alone gives the same result as in a batch.
    alone, _ = model(*(e[2:3] for e in embs), history[2:3])
    torch.testing.assert_close(alone, probs[2:3], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", list(FusionType))
def test_absent_modalities_weigh_exactly_zero_and_their_content_is_ignored(ci_spec, fusion):
    torch.manual_seed(0)
    model = FusionRanker(RankerConfig.from_spec(ci_spec, fusion=fusion)).eval()
    torch.nn.init.normal_(model.missing)  # as after training: the missing vectors are not zeros
    embs, history = _inputs(ci_spec, n=14)
    mask = torch.from_numpy(presence_patterns(3, 14).astype(np.float32))  # rows 4-6: a single modality, 6: text
    probs, weights = model(*embs, history, mask)
    assert torch.equal(weights[mask == 0], torch.zeros(int((mask == 0).sum())))
    torch.testing.assert_close(weights.sum(1), torch.ones(14))
    assert torch.equal(weights[6], torch.tensor([1.0, 0.0, 0.0]))  # text alone carries the whole score
    # Whatever an absent row's embedding holds (the route sends zeros; NaN here) changes nothing.
    poisoned = [torch.where(mask[:, i:i + 1] > 0, e, torch.full_like(e, float("nan"))) for i, e in enumerate(embs)]
    probs_poisoned, weights_poisoned = model(*poisoned, history, mask)
    assert torch.equal(probs_poisoned, probs) and torch.equal(weights_poisoned, weights)
    # Absence changes the score (the ranker is told), and a complete row scores as without a mask.
    assert not torch.allclose(probs[1:4], model(*(e[1:4] for e in embs), history[1:4])[0])
    torch.testing.assert_close(probs[0], model(*(e[:1] for e in embs), history[:1])[0][0])
    alone, _ = model(*(e[5:6] for e in embs), history[5:6], mask[5:6])
    torch.testing.assert_close(alone, probs[5:6], atol=1e-6, rtol=1e-5)


def test_masked_softmax_keeps_gradients_finite_when_everything_is_absent():
    logits = torch.tensor([[200.0, -3.0, 1.0], [0.5, 0.2, 9.0]], requires_grad=True)
    present = torch.tensor([[False, True, True], [False, False, False]])
    weights = masked_softmax(logits, present, 1)
    assert weights[0, 0] == 0 and torch.equal(weights[1], torch.zeros(3))
    torch.testing.assert_close(weights[0].sum(), torch.tensor(1.0))
    (weights * torch.arange(3.0)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_dropout_mask_keeps_a_modality_in_every_row():
    mask = dropout_mask(np.random.default_rng(0), 20000, 3, 0.3)
    assert mask.dtype == np.float32 and (mask.sum(1) >= 1).all()
    assert 0.27 < 1 - mask.mean() < 0.31  # ~0.3 dropped, a little less after refilling the empty rows
    assert np.array_equal(mask, dropout_mask(np.random.default_rng(0), 20000, 3, 0.3))
    assert dropout_mask(np.random.default_rng(0), 10, 3, 0.0).all()


def test_weights_follow_the_inputs_for_attention_and_gated(ci_spec):
    for fusion in (FusionType.ATTENTION, FusionType.GATED):
        model = FusionRanker(RankerConfig.from_spec(ci_spec, fusion=fusion)).eval()
        embs, history = _inputs(ci_spec)
        _, weights = model(*embs, history)
        assert weights.std(0).max() > 0, f"{fusion}: weights do not depend on the candidate"


def test_single_modality_ranker(ci_spec):
    model = FusionRanker(RankerConfig.from_spec(ci_spec, modalities=(Modality.TEXT,))).eval()
    embs, history = _inputs(ci_spec)
    probs, weights = model(embs[0], history)
    assert probs.shape == (6, 1) and torch.equal(weights, torch.ones(6, 1))


def test_checkpoint_round_trip_and_mismatch(ci_spec, tmp_path):
    model = FusionRanker(RankerConfig.from_spec(ci_spec, fusion=FusionType.LATE)).eval()
    path = save_ranker(model, tmp_path / "r.pt")
    loaded = load_ranker(path, spec=ci_spec)
    embs, history = _inputs(ci_spec)
    torch.testing.assert_close(loaded(*embs, history)[0], model(*embs, history)[0])
    data = to_dict(ci_spec, drop=("source",))
    data["ranker"]["history"]["vocab_size"] = 999
    with pytest.raises(CheckpointError, match="vocab 201"):
        load_ranker(path, spec=from_dict(data))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ranker(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_ranker(tmp_path / "garbage.pt")


class _RunsCode:
    """Unpickling this runs code (it writes a file): what a tampered checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoints_holding_code_are_refused(ci_spec, tmp_path):
    """Every torch.load reads weights only (weights_only=True): a pickle that would run code is refused, and the
    code never runs; the same file unpickled in full would run it."""
    import dataclasses

    from fusionrank.model.encoders import AudioEncoder

    marker = tmp_path / "ran.txt"
    model = FusionRanker(RankerConfig.from_spec(ci_spec)).eval()
    ranker = tmp_path / "ranker.pt"
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
                "metrics": {"auc": _RunsCode(marker)}}, ranker)
    audio = tmp_path / "audio.pt"
    torch.save({**AudioEncoder(ci_spec.modalities.audio).state_dict(), "extra": _RunsCode(marker)}, audio)
    with pytest.raises(CheckpointError, match="ranker checkpoint .* cannot be loaded: .*Weights only load failed"):
        load_ranker(ranker)
    data = to_dict(ci_spec, drop=("source",))
    data["modalities"]["audio"]["encoder"]["checkpoint"] = str(audio)
    with pytest.raises(CheckpointError, match="modalities.audio.encoder.checkpoint: cannot load"):
        build_encoder(from_dict(data), Modality.AUDIO)
    assert not marker.exists(), "the checkpoint's code ran"
    torch.load(ranker, weights_only=False)  # what the refusal prevents
    assert marker.read_text() == "code ran"


def test_encoders_shapes_and_text_pooling(ci_spec):
    from fusionrank.preprocess import build_preprocessor

    text = build_encoder(ci_spec, Modality.TEXT)
    arrays = build_preprocessor(ci_spec, Modality.TEXT)([b"hiking boots", b"espresso machine for the kitchen"])
    emb = text(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))  # normalize: true
    # Mean pooling ignores padding: the same title padded to a longer bucket embeds the same.
    ids, mask = (torch.from_numpy(arrays[k][:1]) for k in ("input_ids", "attention_mask"))
    padded = text(torch.nn.functional.pad(ids, (0, 16)), torch.nn.functional.pad(mask, (0, 16)))
    torch.testing.assert_close(padded, emb[:1], atol=1e-5, rtol=1e-4)
    image = build_encoder(ci_spec, Modality.IMAGE)
    size = ci_spec.modalities.image.size
    assert image(torch.zeros(2, 3, size, size)).shape == (2, 512)
    audio = build_encoder(ci_spec, Modality.AUDIO)
    a = ci_spec.modalities.audio
    assert audio(torch.zeros(2, a.n_mels, a.num_frames)).shape == (2, 128)


def test_seeded_init_is_deterministic(ci_spec):
    a, b = build_encoder(ci_spec, Modality.AUDIO), build_encoder(ci_spec, Modality.AUDIO)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 128, 101)).astype(np.float32))
    torch.testing.assert_close(a(x), b(x))
