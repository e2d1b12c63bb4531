"""Typed errors shared across fusionrank; the CLI turns each into a clear message and a non-zero exit."""

from __future__ import annotations


class FusionRankError(Exception):
    """Base class of every error fusionrank raises on purpose."""


class SpecError(FusionRankError):
    """`pipeline.yaml` is missing, unreadable or has a field with a bad value."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"pipeline spec: field '{field}' has value {value!r}; allowed: {allowed}")


class CheckpointError(FusionRankError):
    """A checkpoint directory or file is missing or cannot be read."""


class DataError(FusionRankError):
    """Benchmark data, a cached artefact or an input file is missing or malformed."""


class PreprocessError(FusionRankError):
    """One input cannot be preprocessed; the message names the input and the problem."""

    def __init__(self, input_name: str, problem: str):
        self.input_name = input_name
        self.problem = problem
        super().__init__(f"{input_name}: {problem}")


class RequestValidationError(PreprocessError):
    """A ranking request is malformed as a whole (missing input, rows that disagree, no candidates); the message
    names the offending input."""


class DoorError(FusionRankError):
    """A TLS file or an admin key that cannot be used."""


class ParityError(FusionRankError):
    """An exported model disagrees with its PyTorch reference beyond the spec's tolerance."""

    def __init__(self, model: str, output: str, max_diff: float, tolerance: str):
        self.model = model
        self.output = output
        self.max_diff = max_diff
        self.tolerance = tolerance
        super().__init__(
            f"parity failed for model '{model}', output '{output}': max |diff| = {max_diff:.3g} exceeds {tolerance}"
        )
