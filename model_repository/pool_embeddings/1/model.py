"""Triton Python model `pool_embeddings`: a thin shell over fusionrank.triton.pool (PoolModel)."""

from fusionrank.triton.pool import PoolModel as TritonPythonModel  # noqa: F401
