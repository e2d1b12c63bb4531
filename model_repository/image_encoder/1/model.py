"""Triton Python model `image_encoder`: a thin shell over fusionrank.serving.triton_models (OnnxRuntimeModel)."""

from fusionrank.serving.triton_models import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
