"""Triton Python model `pool_embeddings`: a thin shell over fusionrank.triton.models (PoolModel)."""

from fusionrank.triton.models import PoolModel as TritonPythonModel  # noqa: F401
