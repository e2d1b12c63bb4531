"""What a video candidate costs beside a still: preprocessing (PyAV decode + K frames through the image
preprocessing) and the image encoder (PyTorch, K rows instead of one), on the catalogue's clips and their covers.

    fusionrank bench video [--spec pipeline.yaml] [--clips 64] [--repeats 3]

Prints the best of `repeats` timings per clip and per still. Figures on the 2-core development machine are in
docs/evaluation.md ("Video candidates").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from fusionrank.contract.spec import Modality, load_spec
from fusionrank.model.encoders import build_encoder
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.preprocess import build_preprocessor
from fusionrank.preprocess.video import VideoPreprocessor


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs of `fn` (the least disturbed by other work on a shared machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.inference_mode()
def measure(spec_path: str | None, clips: int, repeats: int) -> list[str]:
    """One line per source (clips, covers): bytes, preprocessing and encoder milliseconds per item."""
    spec = load_spec(spec_path)
    bench = load_benchmark(spec)
    items = [it for it in bench.items if it.is_video][:clips]
    sources = {"clip": ([it.video_bytes() for it in items],
                        VideoPreprocessor(spec.modalities.video, spec.modalities.image)),
               "still (their covers)": ([it.image_bytes() for it in items], build_preprocessor(spec, Modality.IMAGE))}
    encoder = build_encoder(spec, Modality.IMAGE)
    lines = []
    for name, (payloads, preprocess) in sources.items():
        pixels = torch.from_numpy(preprocess(payloads)["pixel_values"])
        pre_s = best_seconds(lambda p=preprocess, b=payloads: p(b), repeats)
        enc_s = best_seconds(lambda x=pixels: encoder(x), repeats)
        n = len(payloads)
        lines.append(f"{n} x {name}: {np.mean([len(b) for b in payloads]):.0f} B, {len(pixels) // n} encoder row(s) "
                     f"each; preprocess {pre_s / n * 1000:.2f} ms, image encoder {enc_s / n * 1000:.2f} ms per item")
    return lines


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=64, help="clips (and as many stills) measured")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")


def main(args: argparse.Namespace) -> int:
    for line in measure(getattr(args, "spec", None), args.clips, args.repeats):
        print(line)
    return 0
