"""Closed sets (enums) and the checks every spec section uses; `to_dict` gives the plain-data view of any section."""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path

from fusionrank.contract.errors import SpecError

DEFAULT_TEXT_CHECKPOINT = "builtin:all-MiniLM-L6-v2"


class Pooling(str, enum.Enum):
    CLS = "cls"
    MEAN = "mean"


class FusionType(str, enum.Enum):
    CONCAT = "concat"
    WEIGHTED = "weighted"
    ATTENTION = "attention"
    GATED = "gated"
    LATE = "late"
    TWO_TOWER = "two_tower"


class RecurrentCell(str, enum.Enum):
    LSTM = "lstm"
    GRU = "gru"


class ResNetArch(str, enum.Enum):
    RESNET_18 = "resnet-18"
    RESNET_34 = "resnet-34"
    RESNET_50 = "resnet-50"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class HardwareCompatibility(str, enum.Enum):
    """TensorRT's `HardwareCompatibilityLevel` of a build: which GPUs a plan may run on besides the builder's model.

    none: the builder's GPU model only (fastest); same_compute_capability: any GPU of its compute capability (an
    H100 plan on an H200, both 9.0); ampere_plus: any Ampere or newer GPU (slower: no cuDNN/cuBLAS tactics)."""

    NONE = "none"
    SAME_COMPUTE_CAPABILITY = "same_compute_capability"
    AMPERE_PLUS = "ampere_plus"


class CalibrationMethod(str, enum.Enum):
    """How static INT8 quantization picks activation ranges from calibration samples (ONNX Runtime's methods)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class ServingProfile(str, enum.Enum):
    """Which backend runs the encoders and the ranker; every profile has its own config file per model, chosen at
    start-up with Triton's `--model-config-name` (see `fusionrank.triton.render`)."""

    GPU = "gpu"  # TensorRT plans on the GPU: the production profile, in the default config.pbtxt
    CPU = "cpu"  # ONNX Runtime inside Python-backend models
    ONNX_GPU = "onnx_gpu"  # Triton's onnxruntime backend on the GPU (no engine build needed)

    @property
    def config_name(self) -> str | None:
        """Triton's `--model-config-name` for this profile; None: the default `config.pbtxt`."""
        return None if self is ServingProfile.GPU else self.value

    @property
    def config_file(self) -> str:
        """The profile's config file, relative to a model's folder."""
        return "config.pbtxt" if self.config_name is None else f"configs/{self.config_name}.pbtxt"

    def served_config(self, model_dir: Path) -> Path:
        """The config Triton reads for this profile in `model_dir`: the profile's file, else `config.pbtxt` (Triton
        falls back to it; a profile's file is rendered only where it differs)."""
        own = Path(model_dir) / self.config_file
        return own if own.is_file() else Path(model_dir) / "config.pbtxt"


def choices(enum_cls: type[enum.Enum]) -> list[str]:
    """The values of a closed set, e.g. for a command-line option's `choices`."""
    return [m.value for m in enum_cls]



def fail(field_name: str, value: object, allowed: str) -> typing.NoReturn:
    raise SpecError(field_name, value, allowed)


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        fail(name, value, "a number > 0")


def check_sorted_unique(name: str, values: tuple[int, ...]) -> None:
    if not values or list(values) != sorted(set(values)) or values[0] <= 0:
        fail(name, list(values), "a non-empty, strictly increasing list of positive integers")



def to_dict(obj, drop: tuple[str, ...] = ()) -> dict:
    """Plain-data view of a spec object (enums as their values), e.g. for JSON config parameters."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in drop}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(obj)
