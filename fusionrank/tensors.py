"""Tensor contract of every model in the pipeline, declared once and derived from the spec.

`torch2onnx` takes its input/output names and dynamic axes from here, `render` its Triton inputs/outputs, and
`onnx2trt` its optimisation-profile inputs. Dims exclude the batch dimension; -1 marks a dynamic axis, whose name
is given in `axes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fusionrank.spec import Modality, PipelineSpec, member_models


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "bytes" for Triton BYTES
    dims: tuple[int, ...]
    axes: tuple[str, ...] = ()  # names of the dynamic dims in `dims`, in order

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
CLICK_PROBABILITY = "click_probability"
MODALITY_WEIGHTS = "modality_weights"


def embedding_name(modality: Modality) -> str:
    return f"{modality.value}_embedding"


def encoder_inputs(spec: PipelineSpec, modality: Modality) -> tuple[TensorSpec, ...]:
    """Inputs of one modality's encoder, which are also outputs of the preprocessing model."""
    m = spec.modalities
    if modality is Modality.TEXT:
        return (TensorSpec("input_ids", "int64", (-1,), ("sequence",)),
                TensorSpec("attention_mask", "int64", (-1,), ("sequence",)))
    if modality is Modality.IMAGE:
        return (TensorSpec("pixel_values", "float32", (3, m.image.size, m.image.size)),)
    return (TensorSpec("log_mel", "float32", (m.audio.n_mels, m.audio.num_frames)),)


def model_io(spec: PipelineSpec, model: str) -> ModelIO:
    """Inputs and outputs of one model (a member, the route or the reference ensemble) by its Triton name."""
    enabled = spec.modalities.enabled
    history = TensorSpec(USER_HISTORY, "int64", (spec.ranker.history.length,))
    ranker_out = (TensorSpec(CLICK_PROBABILITY, "float32", (1,)),
                  TensorSpec(MODALITY_WEIGHTS, "float32", (len(enabled),)))
    items = tuple(TensorSpec(ITEM_INPUT[mod], "bytes", (1,)) for mod in enabled)
    if model == "preprocess":
        outputs = tuple(t for mod in enabled for t in encoder_inputs(spec, mod))
        return ModelIO(model, (*items, history), (*outputs, TensorSpec("history", "int64", history.dims)))
    for modality in enabled:
        if model == f"{modality.value}_encoder":
            out = TensorSpec(embedding_name(modality), "float32", (spec.modalities.embedding_dim(modality),))
            return ModelIO(model, encoder_inputs(spec, modality), (out,))
    if model == "fusion_ranker":
        embeddings = tuple(TensorSpec(embedding_name(mod), "float32", (spec.modalities.embedding_dim(mod),))
                           for mod in enabled)
        return ModelIO(model, (*embeddings, TensorSpec("history", "int64", history.dims)), ranker_out)
    routes = (spec.serving.route, spec.serving.reference_ensemble)
    if model in routes:
        return ModelIO(model, (*items, history), ranker_out)
    raise KeyError(f"unknown model {model!r}; known: {', '.join((*routes, *member_models(spec)))}")


def request_arrays(items: Mapping[Modality, Sequence[bytes]], history: np.ndarray) -> dict[str, np.ndarray]:
    """The ranking contract's input arrays of one request: one [N, 1] BYTES column per modality in `items` (its
    payloads, one per candidate) and the history as given (int64 [N, L] in a valid request)."""
    columns = {ITEM_INPUT[m]: np.array([bytes(b) for b in rows], dtype=object).reshape(-1, 1)
               for m, rows in items.items()}
    return {**columns, USER_HISTORY: np.ascontiguousarray(history)}


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
