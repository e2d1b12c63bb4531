"""The Triton models: their Python-backend classes (`models`) and `render`, which writes `model_repository/`
from the spec."""
