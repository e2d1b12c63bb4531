"""Triton Python model `preprocess`: a thin shell over fusionrank.triton.preprocess (PreprocessModel)."""

from fusionrank.triton.preprocess import PreprocessModel as TritonPythonModel  # noqa: F401
