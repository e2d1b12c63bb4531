"""Triton Python model `pool_embeddings`: a thin shell over fusionrank.serving.triton_models (PoolModel)."""

from fusionrank.serving.triton_models import PoolModel as TritonPythonModel  # noqa: F401
