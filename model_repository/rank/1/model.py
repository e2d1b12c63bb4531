"""Triton Python model `rank`: a thin shell over fusionrank.triton.models (RouteModel)."""

from fusionrank.triton.models import RouteModel as TritonPythonModel  # noqa: F401
