"""Triton Python model `preprocess`: a thin shell over fusionrank.triton.models (PreprocessModel)."""

from fusionrank.triton.models import PreprocessModel as TritonPythonModel  # noqa: F401
