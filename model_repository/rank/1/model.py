"""Triton Python model `rank`: a thin shell over fusionrank.triton.route (RouteModel)."""

from fusionrank.triton.route import RouteModel as TritonPythonModel  # noqa: F401
