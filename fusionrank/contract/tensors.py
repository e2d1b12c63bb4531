"""Tensor contract of every model in the pipeline, declared once and derived from the spec.

`torch2onnx` takes its input/output names and dynamic axes from here, `render` its Triton inputs/outputs, and
`onnx2trt` its optimisation-profile inputs. Dims exclude the batch dimension; -1 marks a dynamic axis, whose name
is given in `axes`.

Ragged candidates (the contract's answer to "this item has no audio", docs/route.md, "Ranking contract"):
- `modality_present` (BOOL [N, M], optional): per candidate and enabled modality, in the order of
  `modality_weights` (text, image, audio), whether the modality is present. Left out: every modality is present,
  so requests written before it existed mean what they meant. An absent modality's payload must be empty (b"");
  a non-empty payload marked absent, an empty or malformed payload marked present, and a candidate with no modality
  present are INVALID_ARGUMENT naming the input and the row: absence is only ever said explicitly.
- `item_video` (BYTES [N, 1], optional): a short MP4/WebM per candidate, b"" for none. It is a second source of the
  image modality: the image modality is present when the candidate has a still (`item_image`), a video, or both.
  Its frames and the still are pooled together (the still counts as one more frame).
- `modality_mask` (FP32 [N, M], 1 present / 0 absent): the fusion ranker's input saying the same, after
  validation. Float, not BOOL, so every runtime (ONNX Runtime, TensorRT, INT8 calibration) takes it as it takes
  the embeddings.
- Inside the reference ensemble, `preprocess` sends each encoder only the rows that have its modality (a video's K
  frames are image rows too) with `<modality>_owner` (INT64 [R, 1]: the candidate each row belongs to), and
  `pool_embeddings` (no batching: its inputs hold R rows, its outputs N) puts the encoders' rows back in candidate
  order, mean-pooling a candidate's frames, zeros where absent: the route does the same in process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fusionrank.contract.names import POOL_MODEL, PREPROCESS, RANKER, encoder_modality, encoder_name
from fusionrank.contract.spec import Modality, PipelineSpec, member_models


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "bytes" for Triton BYTES
    dims: tuple[int, ...]
    axes: tuple[str, ...] = ()  # names of the dynamic dims in `dims`, in order
    optional: bool = False  # a request may leave it out (Triton's `optional: true`)

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes (batch included, as axis 0)."""
        named = iter(self.axes)
        return {0: "batch", **{i + 1: next(named) for i, d in enumerate(self.dims) if d == -1}}


@dataclass(frozen=True)
class ModelIO:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


# The ranking contract's tensor names (the route and the reference ensemble), one row per candidate.
ITEM_INPUT = {Modality.TEXT: "item_text", Modality.IMAGE: "item_image", Modality.AUDIO: "item_audio"}
USER_HISTORY = "user_history"
# Request parameter: the caller's deadline as wall-clock microseconds since the epoch. Triton's `timeout` says how long
# a request may wait in the queue, but a Python model cannot see how long it already waited; the absolute deadline
# lets the route count what is really left (clocks of one cluster agree to well under the deadlines involved).
DEADLINE_PARAMETER = "fusionrank_deadline_unix_us"
# Request parameter: the Triton priority level the caller set (1 is served first). The Python backend does not tell a
# model its request's priority, and the route's own queue (its gate) serves waiters by level.
PRIORITY_PARAMETER = "fusionrank_priority_level"


def deadline_arguments(remaining_s: float) -> dict:
    """tritonclient's `infer` arguments that send a call's deadline, `remaining_s` from now: Triton's request
    `timeout` (microseconds) and the absolute `DEADLINE_PARAMETER`, so a server past capacity refuses the request at
    once instead of serving it late."""
    return {"timeout": max(1, int(remaining_s * 1e6)),
            "parameters": {DEADLINE_PARAMETER: int((time.time() + remaining_s) * 1e6)}}


CLICK_PROBABILITY = "click_probability"
MODALITY_WEIGHTS = "modality_weights"
MODALITY_PRESENT = "modality_present"
ITEM_VIDEO = "item_video"
MODALITY_MASK = "modality_mask"


def embedding_name(modality: Modality) -> str:
    return f"{modality.value}_embedding"


def owner_name(modality: Modality) -> str:
    """`preprocess` output: the candidate each of the modality's encoder rows belongs to (-1: a placeholder)."""
    return f"{modality.value}_owner"


def rows_name(modality: Modality) -> str:
    """Ensemble tensor: the modality's encoder output, one row per encoded row (before `pool_embeddings`)."""
    return f"{modality.value}_rows"


def encoder_inputs(spec: PipelineSpec, modality: Modality) -> tuple[TensorSpec, ...]:
    """Inputs of one modality's encoder, which are also outputs of the preprocessing model."""
    m = spec.modalities
    if modality is Modality.TEXT:
        return (TensorSpec("input_ids", "int64", (-1,), ("sequence",)),
                TensorSpec("attention_mask", "int64", (-1,), ("sequence",)))
    if modality is Modality.IMAGE:
        return (TensorSpec("pixel_values", "float32", (3, m.image.size, m.image.size)),)
    return (TensorSpec("log_mel", "float32", (m.audio.n_mels, m.audio.num_frames)),)


def optional_request_inputs(spec: PipelineSpec) -> tuple[TensorSpec, ...]:
    """The ranking contract's optional inputs: `modality_present` and, with video enabled, `item_video`."""
    present = TensorSpec(MODALITY_PRESENT, "bool", (len(spec.modalities.enabled),), optional=True)
    video = (TensorSpec(ITEM_VIDEO, "bytes", (1,), optional=True),) if spec.modalities.video_enabled else ()
    return (present, *video)


def _history(spec: PipelineSpec) -> TensorSpec:
    return TensorSpec(USER_HISTORY, "int64", (spec.ranker.history.length,))


def _mask(spec: PipelineSpec) -> TensorSpec:
    return TensorSpec(MODALITY_MASK, "float32", (len(spec.modalities.enabled),))


def _ranking_io(spec: PipelineSpec, model: str) -> ModelIO:
    """The ranking contract (the route and the reference ensemble): one row per candidate."""
    enabled = spec.modalities.enabled
    items = (*(TensorSpec(ITEM_INPUT[mod], "bytes", (1,)) for mod in enabled), _history(spec),
             *optional_request_inputs(spec))
    return ModelIO(model, items, (TensorSpec(CLICK_PROBABILITY, "float32", (1,)),
                                  TensorSpec(MODALITY_WEIGHTS, "float32", (len(enabled),))))


def _preprocess_io(spec: PipelineSpec, model: str) -> ModelIO:
    enabled = spec.modalities.enabled
    outputs = tuple(t for mod in enabled for t in (*encoder_inputs(spec, mod),
                                                   TensorSpec(owner_name(mod), "int64", (1,))))
    history = TensorSpec("history", "int64", _history(spec).dims)
    return ModelIO(model, _ranking_io(spec, model).inputs, (*outputs, history, _mask(spec)))


def _pool_io(spec: PipelineSpec, model: str) -> ModelIO:
    """max_batch_size 0: full shapes."""
    enabled = spec.modalities.enabled
    dims = {mod: spec.modalities.embedding_dim(mod) for mod in enabled}
    inputs = tuple(t for mod in enabled for t in (TensorSpec(rows_name(mod), "float32", (-1, dims[mod])),
                                                  TensorSpec(owner_name(mod), "int64", (-1, 1))))
    outputs = tuple(TensorSpec(embedding_name(mod), "float32", (-1, dims[mod])) for mod in enabled)
    return ModelIO(model, (*inputs, TensorSpec(MODALITY_MASK, "float32", (-1, len(enabled)))), outputs)


def _ranker_io(spec: PipelineSpec, model: str) -> ModelIO:
    embeddings = tuple(TensorSpec(embedding_name(mod), "float32", (spec.modalities.embedding_dim(mod),))
                       for mod in spec.modalities.enabled)
    history = TensorSpec("history", "int64", _history(spec).dims)
    return ModelIO(model, (*embeddings, history, _mask(spec)), _ranking_io(spec, model).outputs)


def _encoder_io(spec: PipelineSpec, model: str) -> ModelIO:
    modality = encoder_modality(model)
    out = TensorSpec(embedding_name(modality), "float32", (spec.modalities.embedding_dim(modality),))
    return ModelIO(model, encoder_inputs(spec, modality), (out,))


_MEMBER_IO = {PREPROCESS: _preprocess_io, POOL_MODEL: _pool_io, RANKER: _ranker_io,
              **{encoder_name(m): _encoder_io for m in Modality}}


def model_io(spec: PipelineSpec, model: str) -> ModelIO:
    """Inputs and outputs of one model (a member, the route or the reference ensemble) by its Triton name."""
    if model in member_models(spec):
        return _MEMBER_IO[model](spec, model)
    routes = (spec.serving.route, spec.serving.reference_ensemble)
    if model in routes:
        return _ranking_io(spec, model)
    raise KeyError(f"unknown model {model!r}; known: {', '.join((*routes, *member_models(spec)))}")


def _column(rows: Sequence[bytes | None]) -> np.ndarray:
    return np.array([b"" if b is None else bytes(b) for b in rows], dtype=object).reshape(-1, 1)


def request_arrays(items: Mapping[Modality, Sequence[bytes | None]], history: np.ndarray,
                   videos: Sequence[bytes | None] | None = None) -> dict[str, np.ndarray]:
    """The ranking contract's input arrays of one request: one [N, 1] BYTES column per modality in `items` (one
    payload per candidate; None = absent), the history as given (int64 [N, L] in a valid request), `item_video`
    when a candidate has a video (None = none) and `modality_present` (columns in enabled-modality order: `items`
    holds every enabled modality) only when a candidate lacks a modality, so a complete request without video is
    the same as before those inputs existed."""
    columns = {ITEM_INPUT[m]: _column(rows) for m, rows in items.items()}
    arrays = {**columns, USER_HISTORY: np.ascontiguousarray(history)}
    has_video = videos is not None and any(v is not None for v in videos)
    if has_video:
        arrays[ITEM_VIDEO] = _column(videos)
    order = [m for m in Modality if m in items]
    present = np.array([[v is not None for v in items[m]] for m in order], dtype=bool).T.reshape(-1, len(order))
    if has_video and Modality.IMAGE in order:
        present[:, order.index(Modality.IMAGE)] |= np.array([v is not None for v in videos], dtype=bool)
    if not present.all():
        arrays[MODALITY_PRESENT] = present
    return arrays


def infer_input(module, name: str, array: np.ndarray, with_data: bool = True):
    """A tritonclient `InferInput` named `name` with `array`'s shape and Triton dtype (`module` is
    `tritonclient.grpc`, `tritonclient.grpc.aio` or `tritonclient.http`). with_data=False leaves the data to be set
    later, e.g. from a shared-memory region."""
    from tritonclient.utils import np_to_triton_dtype

    tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    if with_data:
        tensor.set_data_from_numpy(array)
    return tensor


def infer_inputs(module, arrays: Mapping[str, np.ndarray]) -> list:
    """One `InferInput` per named array, data included, in the mapping's order."""
    return [infer_input(module, name, array) for name, array in arrays.items()]
