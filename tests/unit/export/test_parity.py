"""Parity checks and export's argument errors without exporting: the output check names model, output, diff and
tolerance; the ranking gate; a missing checkpoint or an unknown model is refused."""

from __future__ import annotations

import numpy as np
import pytest

from export.verify.parity import check_outputs, ranking_parity
from fusionrank.contract.errors import ParityError
from fusionrank.contract.spec import RankingParitySpec, Tolerance
from fusionrank_cli.main import main


def test_check_outputs_names_model_output_diff_and_tolerance():
    ref = {"click_probability": np.array([[0.5], [0.25]], dtype=np.float32)}
    ok = check_outputs("fusion_ranker", ref, {"click_probability": ref["click_probability"] + 1e-7},
                       lambda name: Tolerance(1e-5, 1e-4))
    assert ok[0].passed and ok[0].max_abs_diff < 1e-6
    with pytest.raises(ParityError) as info:
        check_outputs("fusion_ranker", ref, {"click_probability": ref["click_probability"] + 0.01},
                      lambda name: Tolerance(1e-5, 1e-4))
    message = str(info.value)
    assert "fusion_ranker" in message and "click_probability" in message and "0.01" in message
    assert "atol=1e-05" in message
    with pytest.raises(ParityError, match="inf"):
        check_outputs("m", ref, {"click_probability": np.zeros((3, 1))}, lambda name: Tolerance())


def test_ranking_parity_gate():
    rng = np.random.default_rng(0)
    scores = rng.random(200)
    labels = (rng.random(200) < scores).astype(int)
    groups = np.repeat(np.arange(10), 20)
    gate = RankingParitySpec()
    same = ranking_parity(scores, scores + 1e-9, labels, groups, gate)
    assert same.passed and same.top10_overlap == 1.0 and same.kendall_tau == pytest.approx(1.0)
    reversed_ = ranking_parity(scores, -scores, labels, groups, gate)
    assert not reversed_.passed and reversed_.kendall_tau < 0
    with pytest.raises(ParityError, match="top10_overlap"):
        ranking_parity(scores, -scores, labels, groups, gate, raise_on_fail=True)


def test_export_without_checkpoint_is_a_clear_error(ci_spec, tmp_path, capsys):
    from tests.paths import CI_SPEC

    missing = tmp_path / "none.pt"
    code = main(["export", "--spec", str(CI_SPEC), "--repository", str(tmp_path / "repo"),
                 "--checkpoint", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "fusionrank train" in err
    code = main(["export", "--spec", str(CI_SPEC), "--repository", str(tmp_path / "repo"), "--models", "vgg"])
    assert code == 2 and "exportable models" in capsys.readouterr().err
