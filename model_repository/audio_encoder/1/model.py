"""Triton Python model `audio_encoder`: a thin shell over fusionrank.triton.exported (OnnxRuntimeModel)."""

from fusionrank.triton.exported import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
