"""Fixtures of the route's unit tests."""

from __future__ import annotations

import pytest

from fusionrank.request.validation import RequestPreprocessor


@pytest.fixture(scope="module")
def preparer(ci_spec):
    """The route's in-process request preprocessing on the CI spec."""
    return RequestPreprocessor(ci_spec)
