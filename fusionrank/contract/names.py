"""What the served pipeline's parts are called, in one place: the modalities and the Triton models.

The member models keep these names in every profile; the route and the reference ensemble default to `ROUTE` and
`ENSEMBLE` but take theirs from the spec (`serving.route`, `serving.reference_ensemble`), so code reads those two
from the spec, never from here.
"""

from __future__ import annotations

import enum


class Modality(str, enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


PREPROCESS = "preprocess"  # validates and preprocesses every input of a request (the reference ensemble's first step)
# The reference ensemble's step that puts each encoder's rows back in candidate order (pooling a video's frames): its
# inputs hold the encoded rows and its outputs the candidates, so it cannot batch (max_batch_size 0).
POOL_MODEL = "pool_embeddings"
RANKER = "fusion_ranker"
ROUTE = "rank"  # the default of `serving.route`
ENSEMBLE = "rank_ensemble"  # the default of `serving.reference_ensemble`
_ENCODER_SUFFIX = "_encoder"
# A counter each member running concurrent batches publishes (model, instance): microseconds its batches computed.
# Triton's own compute and request durations stop when `execute` hands the batch to a worker and returns.
BATCH_COMPUTE_METRIC = "fusionrank_batch_compute_us"


def encoder_name(modality: Modality) -> str:
    """The Triton model that encodes `modality` (`text_encoder`, ...)."""
    return f"{Modality(modality).value}{_ENCODER_SUFFIX}"


def encoder_modality(model: str) -> Modality | None:
    """The modality `model` encodes, or None when it is no encoder."""
    return next((m for m in Modality if encoder_name(m) == model), None)


ENCODERS = tuple(encoder_name(m) for m in Modality)
# The models exported to ONNX (and built into TensorRT engines): the encoders and the ranker.
ENCODERS_AND_RANKER = (*ENCODERS, RANKER)
# Every member a route or ensemble calls, in pipeline order (a route or ensemble must not shadow one).
MEMBERS = (PREPROCESS, *ENCODERS, POOL_MODEL, RANKER)
