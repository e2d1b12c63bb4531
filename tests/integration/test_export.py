"""torch2onnx: named tensors and axes from the contract, parity proven, golden outputs written, typed failures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.convert.torch2onnx import _ort_outputs, _session, _torch_outputs, export_onnx
from export.verify.parity import check_outputs
from fusionrank.contract.spec import FusionType
from fusionrank.contract.tensors import MODALITY_MASK, MODALITY_WEIGHTS, model_io
from fusionrank.model.fusion import FusionRanker, RankerConfig
from fusionrank.request.candidates import presence_patterns

pytestmark = pytest.mark.slow
MODELS = ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")


@pytest.mark.parametrize("model", MODELS)
def test_onnx_has_contract_names_and_named_dynamic_axes(built_repository, ci_spec, model):
    graph = onnx.load(str(built_repository / model / "1" / "model.onnx")).graph
    io = model_io(ci_spec, model)
    assert [i.name for i in graph.input] == [t.name for t in io.inputs]
    assert [o.name for o in graph.output] == [t.name for t in io.outputs]
    for value, tensor in zip(graph.input, io.inputs):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        for d, expected in zip(dims[1:], tensor.dims):
            if expected == -1:
                assert d.dim_param == "sequence"
            else:
                assert d.dim_value == expected


def test_parity_report_and_golden_outputs(built_repository, ci_spec):
    report = json.loads((built_repository / "parity.json").read_text())
    assert {o["model"] for o in report["outputs"]} == set(MODELS)
    assert all(o["passed"] for o in report["outputs"])
    assert report["ranking"]["passed"] and report["ranking"]["kendall_tau"] > 0.99
    ranker_rows = [o["inputs"] for o in report["outputs"] if o["model"] == "fusion_ranker"]
    assert any("all present" in r for r in ranker_rows) and any("7 presence patterns" in r for r in ranker_rows)
    # text parity covered every padding bucket
    seqs = {int(o["inputs"].split("]")[0].split(",")[-1]) for o in report["outputs"] if o["model"] == "text_encoder"}
    assert seqs == set(ci_spec.modalities.text.buckets)
    for model in MODELS:
        with np.load(built_repository / model / "1" / "golden.npz") as golden:
            io = model_io(ci_spec, model)
            assert {f"in.{t.name}" for t in io.inputs} | {f"out.{t.name}" for t in io.outputs} <= set(golden.files)
    with np.load(built_repository / "fusion_ranker" / "1" / "golden.npz") as golden:
        assert len(golden["labels"]) == len(golden["out.click_probability"]) == len(golden["groups"])
    assert (built_repository / "preprocess" / "1" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("fusion", list(FusionType))
def test_every_fusion_exports_with_parity_at_another_batch_size(ci_spec, tmp_path, fusion):
    """Each fusion (seeded, untrained) exported with a batch of 4 matches PyTorch at a batch of 14 within the spec,
    on every presence pattern (down to text alone) as well as on complete candidates."""
    torch.manual_seed(0)
    module = FusionRanker(RankerConfig.from_spec(ci_spec, fusion=fusion)).eval()
    torch.nn.init.normal_(module.missing)  # as after training with modality dropout
    rng = np.random.default_rng(1)
    io = model_io(ci_spec, "fusion_ranker")
    assert io.inputs[-1].name == MODALITY_MASK

    def inputs(n, mask):
        arrays = {t.name: (rng.integers(0, ci_spec.ranker.history.vocab_size, (n, *t.dims)).astype(np.int64)
                           if t.dtype == "int64" else rng.standard_normal((n, *t.dims)).astype(np.float32))
                  for t in io.inputs}
        return {**arrays, MODALITY_MASK: mask.astype(np.float32)}

    path = export_onnx(module, ci_spec, "fusion_ranker", inputs(4, presence_patterns(3, 4)), tmp_path / "model.onnx")
    session = _session(path)
    for mask in (np.ones((14, 3), dtype=bool), presence_patterns(3, 14)):
        batch = inputs(14, mask)
        reference = _torch_outputs(module, ci_spec, "fusion_ranker", batch)
        actual = _ort_outputs(session, ci_spec, "fusion_ranker", batch)
        results = check_outputs(f"fusion_ranker[{fusion.value}]", reference, actual, ci_spec.export.tolerance)
        assert {r.output for r in results} == {"click_probability", "modality_weights"}
        assert all(r.passed for r in results)
        assert np.array_equal(actual[MODALITY_WEIGHTS] == 0, ~mask)  # exactly 0 in ONNX Runtime too
