"""Triton Python model `preprocess`: a thin shell over fusionrank.serving.triton_models (PreprocessModel)."""

from fusionrank.serving.triton_models import PreprocessModel as TritonPythonModel  # noqa: F401
