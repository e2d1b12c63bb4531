"""Triton Python model `preprocess_history`: a thin shell over fusionrank.serving.triton_models (HistoryModel)."""

from fusionrank.serving.triton_models import HistoryModel as TritonPythonModel  # noqa: F401
