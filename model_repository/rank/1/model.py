"""Triton Python model `rank`: a thin shell over fusionrank.serving.triton_models (RouteModel)."""

from fusionrank.serving.triton_models import RouteModel as TritonPythonModel  # noqa: F401
