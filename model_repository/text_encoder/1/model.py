"""Triton Python model `text_encoder`: a thin shell over fusionrank.triton.models (OnnxRuntimeModel)."""

from fusionrank.triton.models import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
