"""The torch-free serving preprocessors compute what transformers computes: the tokenizer read from tokenizer.json
gives transformers' token ids, padding token and side; the Slaney mel filter bank and Hann window equal
transformers' own to the bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusionrank.contract.errors import CheckpointError
from fusionrank.contract.paths import resolve_text_checkpoint
from fusionrank.preprocess._mel import hann_window, slaney_mel_filter_bank
from fusionrank.preprocess.text import TextPreprocessor, load_tokenizer, read_tokenizer

TEXTS = ["A red bicycle", "  Ünïcödé ÇAFÉ  crème brûlée 北京 ", "emoji 🚲🚲 and tabs\tand\nnewlines",
         " ".join(["word"] * 300), "x"]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    """The builtin checkpoint's tokenizer as export writes it (transformers' save_pretrained)."""
    path = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(resolve_text_checkpoint("builtin:all-MiniLM-L6-v2")).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_tokenizer_matches_transformers(ci_spec, saved_tokenizer, source):
    directory = saved_tokenizer if source == "export" else resolve_text_checkpoint(ci_spec.modalities.text.encoder
                                                                                   .checkpoint)
    hf = load_tokenizer(directory)
    ours = TextPreprocessor(ci_spec.modalities.text, directory)
    expected = hf(TEXTS, truncation=True, max_length=ci_spec.modalities.text.max_length)["input_ids"]
    assert ours.token_ids(TEXTS) == expected
    assert (ours.pad_id, ours.pad_left) == (hf.pad_token_id, hf.padding_side == "left")


def test_tokenizer_padding_side_and_missing_pad(saved_tokenizer, tmp_path):
    for path in saved_tokenizer.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((saved_tokenizer / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert read_tokenizer(tmp_path).pad_left
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "[NOT-A-TOKEN]"}))
    with pytest.raises(CheckpointError, match="no padding token"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        read_tokenizer(tmp_path)


@pytest.mark.parametrize("n_fft,n_mels,fmin,fmax,rate", [(512, 128, 0, 8000, 16000), (400, 80, 20, 7600, 16000),
                                                         (1024, 64, 1200, 11025, 22050)])
def test_mel_filter_bank_matches_transformers(n_fft, n_mels, fmin, fmax, rate):
    from transformers.audio_utils import mel_filter_bank, window_function

    expected = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=fmin,
                               max_frequency=fmax, sampling_rate=rate, norm="slaney", mel_scale="slaney")
    np.testing.assert_array_equal(slaney_mel_filter_bank(n_fft // 2 + 1, n_mels, fmin, fmax, rate), expected)
    np.testing.assert_array_equal(hann_window(n_fft), window_function(n_fft, "hann"))
