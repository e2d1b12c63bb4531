"""The unit tier: no server, no trained or exported model. A unit test that asks for one of the fixtures below is
refused at collection, naming the test and the fixture, so the tier stays the fast loop (`make test-unit`); such a
test belongs in tests/integration/."""

from __future__ import annotations

import pytest

SERVER_FIXTURES = frozenset({"ci_checkpoint", "built_repository", "reference_pipeline", "triton_server",
                             "redis_server", "black_hole"})


def pytest_collection_modifyitems(config, items):
    misplaced = [f"{item.nodeid} uses {', '.join(sorted(SERVER_FIXTURES & set(item.fixturenames)))}"
                 for item in items if "tests/unit/" in item.nodeid and SERVER_FIXTURES & set(item.fixturenames)]
    if misplaced:
        raise pytest.UsageError("unit tests may not start servers or build models (move them to "
                                "tests/integration/):\n  " + "\n  ".join(misplaced))
