"""The pipeline spec: `pipeline.yaml` read in exactly one place (`loader`) into frozen, self-validating objects.

Everything downstream (ONNX axes, tokenizer buckets, Triton configs, TensorRT profiles, load-test SLOs) is derived
from a `PipelineSpec`, so no two parts of the project can disagree about a shape or a name. Sections live in
`modalities` and `sections`, closed sets and shared checks in `base`.
"""

from fusionrank.contract.names import Modality
from fusionrank.contract.spec.admission import AdmissionSpec, CostBudgetSpec, Priority, QueuePolicySpec
from fusionrank.contract.spec.base import (
    DEFAULT_TEXT_CHECKPOINT,
    CalibrationMethod,
    FusionType,
    HardwareCompatibility,
    Pooling,
    Precision,
    RecurrentCell,
    ResNetArch,
    ServingProfile,
    choices,
    to_dict,
)
from fusionrank.contract.spec.loader import from_dict, load_spec
from fusionrank.contract.spec.modalities import (
    AudioEncoderSpec,
    AudioSpec,
    ImageEncoderSpec,
    ImageSpec,
    ModalitiesSpec,
    TextEncoderSpec,
    TextSpec,
    VideoSpec,
)
from fusionrank.contract.spec.pipeline import PipelineSpec, member_models, served_models
from fusionrank.contract.spec.sections import (
    INT8_FILE,
    OPTIMIZED_FILE,
    SLO_FIELDS,
    BatchingSpec,
    CacheSpec,
    CpuExportSpec,
    DataSpec,
    ExportSpec,
    GpuBatchingSpec,
    HistorySpec,
    RankerSpec,
    RankingParitySpec,
    SloSpec,
    SloTargets,
    TensorRTSpec,
    Tolerance,
    TrainSpec,
    UpgradeSpec,
)

__all__ = [
    "DEFAULT_TEXT_CHECKPOINT", "INT8_FILE", "OPTIMIZED_FILE", "SLO_FIELDS",
    "AdmissionSpec", "AudioEncoderSpec", "AudioSpec", "BatchingSpec", "CacheSpec", "CalibrationMethod",
    "CostBudgetSpec", "CpuExportSpec", "DataSpec", "ExportSpec", "FusionType", "GpuBatchingSpec",
    "HardwareCompatibility", "HistorySpec", "ImageEncoderSpec",
    "ImageSpec", "ModalitiesSpec", "Modality", "PipelineSpec", "Pooling", "Precision", "Priority", "QueuePolicySpec",
    "RankerSpec", "RankingParitySpec", "RecurrentCell", "ResNetArch", "ServingProfile", "SloSpec", "SloTargets",
    "TensorRTSpec", "TextEncoderSpec", "TextSpec", "Tolerance", "TrainSpec", "UpgradeSpec", "VideoSpec", "choices",
    "from_dict", "load_spec", "member_models", "served_models", "to_dict",
]
