"""TensorRT optimisation profiles, derived from the spec so they cannot disagree with serving or preprocessing.

Per model and input, a `ShapeRange(min, opt, max)` over the full shape (batch included):
- batch: the spec's GPU batching policy (`serving.gpu.<model>.batch_profiles`: e.g. a small profile tuned for a
  typical request's candidates and a large one, contiguous from 1 to the model's `max_batch_size`, the rendered
  config's, so Triton never sends a batch the engine cannot take); without one, a single profile from 1 to
  `max_batch_size` with opt the largest preferred batch size;
- text sequence (`input_ids`, `attention_mask`): preprocessing pads every request to one of the padding buckets,
  so one profile spans first bucket .. max_length with opt at the middle bucket (titles are short; the kernels
  TensorRT picks for opt are the ones most requests run). With `export.tensorrt.profile_per_bucket` there is one
  profile per bucket instead, each tuned for exactly its bucket (opt = max = bucket, min = previous bucket + 1):
  faster kernels per bucket at the price of a larger plan and longer build;
- every other dim is fixed by the tensor contract (`fusionrank.contract.tensors`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import RANKER, encoder_name
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import TensorSpec, model_io

SEQUENCE_AXIS = "sequence"


class ProfileError(FusionRankError):
    """An optimisation profile is invalid or does not cover a shape serving can produce."""


def engine_models(spec: PipelineSpec) -> tuple[str, ...]:
    """Models exported to ONNX and built as TensorRT engines: one encoder per enabled modality, then the ranker."""
    return (*(encoder_name(m) for m in spec.modalities.enabled), RANKER)


@dataclass(frozen=True)
class ShapeRange:
    """min <= opt <= max, element-wise, over one input's full shape (batch first)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ProfileError(f"shape range {self.describe()}: min, opt and max must have the same rank")
        if any(d < 1 for d in self.min):
            raise ProfileError(f"shape range {self.describe()}: every dim must be >= 1")
        if not all(lo <= o <= hi for lo, o, hi in zip(self.min, self.opt, self.max)):
            raise ProfileError(f"shape range {self.describe()}: needs min <= opt <= max in every dim")

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def describe(self) -> str:
        return f"min={list(self.min)} opt={list(self.opt)} max={list(self.max)}"

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class OptimizationProfile:
    """One TensorRT optimisation profile: a shape range per network input."""

    name: str
    inputs: tuple[tuple[str, ShapeRange], ...]

    def ranges(self) -> dict[str, ShapeRange]:
        return dict(self.inputs)

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """True when every input shape lies inside this profile (inputs it does not declare do not match)."""
        ranges = self.ranges()
        return set(shapes) == set(ranges) and all(ranges[n].contains(tuple(s)) for n, s in shapes.items())

    def as_dict(self) -> dict:
        return {"name": self.name, "inputs": {n: r.as_dict() for n, r in self.inputs}}

    @classmethod
    def from_dict(cls, data: dict) -> OptimizationProfile:
        return cls(data["name"], tuple((n, ShapeRange.from_dict(r)) for n, r in data["inputs"].items()))


def batch_ranges(spec: PipelineSpec, model: str) -> tuple[tuple[int, int, int], ...]:
    """(min, opt, max) batch of each of one model's batch profiles, smallest first (`serving.batch_profiles`)."""
    return spec.serving.batch_profiles(model)


def sequence_ranges(spec: PipelineSpec) -> list[tuple[int, int, int]]:
    """(min, opt, max) of the text sequence axis, one entry per profile."""
    text = spec.modalities.text
    buckets = text.buckets
    if spec.export.tensorrt.profile_per_bucket:
        lows = (1, *(b + 1 for b in buckets[:-1]))
        return [(lo, b, b) for lo, b in zip(lows, buckets)]
    return [(buckets[0], buckets[len(buckets) // 2], text.max_length)]


def _input_range(tensor: TensorSpec, batch: tuple[int, int, int], sequence: tuple[int, int, int]) -> ShapeRange:
    dims = [[d, d, d] for d in tensor.dims]
    axes = iter(tensor.axes)
    for i, d in enumerate(tensor.dims):
        if d != -1:
            continue
        axis = next(axes)
        if axis != SEQUENCE_AXIS:
            raise ProfileError(f"input {tensor.name!r}: no profile rule for dynamic axis {axis!r}")
        dims[i] = list(sequence)
    lo, opt, hi = zip(batch, *dims)
    return ShapeRange(tuple(lo), tuple(opt), tuple(hi))


def model_profiles(spec: PipelineSpec, model: str) -> tuple[OptimizationProfile, ...]:
    """The optimisation profiles of one engine model, in the order they are added to the builder config."""
    if model not in engine_models(spec):
        raise ProfileError(f"{model!r} is not built as an engine; engine models: {', '.join(engine_models(spec))}")
    inputs = model_io(spec, model).inputs
    batches = batch_ranges(spec, model)
    has_sequence = any(SEQUENCE_AXIS in t.axes for t in inputs)
    sequences = sequence_ranges(spec) if has_sequence else [(1, 1, 1)]
    profiles = []
    # Batch outermost: Triton's TensorRT backend and the runner take the first profile that fits, so a small batch
    # of any sequence length finds the small profile first.
    for batch in batches:
        for seq in sequences:
            parts = ([f"b{batch[0]}-{batch[2]}"] if len(batches) > 1 else []) + \
                ([f"seq{seq[0]}-{seq[2]}"] if has_sequence else [])
            name = "_".join(parts) or "default"
            profiles.append(OptimizationProfile(name, tuple((t.name, _input_range(t, batch, seq)) for t in inputs)))
    return tuple(profiles)


def find_profile(profiles: tuple[OptimizationProfile, ...], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Index of the first profile covering `shapes` (Triton and the engine runner pick the same way)."""
    return next((i for i, p in enumerate(profiles) if p.covers(shapes)), None)


def producible_shapes(spec: PipelineSpec, model: str) -> Iterator[dict[str, tuple[int, ...]]]:
    """Every input shape set serving can send this model: each batch 1..max_batch_size times each text bucket."""
    inputs = model_io(spec, model).inputs
    has_sequence = any(SEQUENCE_AXIS in t.axes for t in inputs)
    buckets = spec.modalities.text.buckets if has_sequence else (None,)
    for batch in range(1, spec.serving.batching(model).max_batch_size + 1):
        for bucket in buckets:
            yield {t.name: (batch, *(bucket if d == -1 else d for d in t.dims)) for t in inputs}


def coverage_gaps(spec: PipelineSpec, model: str,
                  profiles: tuple[OptimizationProfile, ...] | None = None) -> list[dict[str, tuple[int, ...]]]:
    """Producible input shapes that no profile covers (empty when the profiles are complete)."""
    profiles = model_profiles(spec, model) if profiles is None else profiles
    return [shapes for shapes in producible_shapes(spec, model) if find_profile(profiles, shapes) is None]


def validate_profiles(spec: PipelineSpec, model: str, profiles: tuple[OptimizationProfile, ...]) -> None:
    """Raise ProfileError naming the first producible shape outside every profile."""
    gaps = coverage_gaps(spec, model, profiles)
    if gaps:
        raise ProfileError(f"{model}: {len(gaps)} input shape(s) serving can produce fall outside every "
                           f"optimisation profile, e.g. {gaps[0]}")
