"""Small, deterministic, valid payloads: warm-up data for the models that preprocess (rendered for `preprocess`,
run in process by the route at start-up)."""

from __future__ import annotations

import io
import wave

import numpy as np

from fusionrank.contract.spec import Modality, PipelineSpec


def warmup_samples(spec: PipelineSpec) -> dict[Modality, bytes]:
    """One valid payload per modality (the spec's image size and audio rate)."""
    from PIL import Image

    size = spec.modalities.image.size
    image = Image.new("RGB", (size + 16, size), (200, 40, 40))
    png = io.BytesIO()
    image.save(png, format="PNG", compress_level=9)
    audio = spec.modalities.audio
    t = np.arange(audio.clip_samples) / audio.sample_rate
    pcm = (0.3 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype("<i2").tobytes()
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio.sample_rate)
        w.writeframes(pcm)
    return {Modality.TEXT: "warm-up title for the text preprocessor".encode(), Modality.IMAGE: png.getvalue(),
            Modality.AUDIO: wav.getvalue()}
