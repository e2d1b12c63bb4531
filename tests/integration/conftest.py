"""Fixtures only the integration tier uses (the shared ones are in tests/conftest.py).

- `reference_pipeline`: the offline PyTorch pipeline on the CI spec's trained ranker and exported tokenizer, the
  reference served scores are compared with.
- `redis_server`, `black_hole`: a real redis-server on loopback, and a port that never answers
  (tests/integration/redis_server.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reference_pipeline(ci_spec, ci_checkpoint, built_repository):
    from fusionrank.contract.paths import tokenizer_dir
    from fusionrank.model.reference import ReferencePipeline

    return ReferencePipeline(ci_spec, ci_checkpoint, tokenizer_dir=tokenizer_dir(built_repository))


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port for one test (redis_server.py beside this file); stopped after it."""
    from tests.integration.redis_server import start_redis

    server = start_redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def black_hole():
    """A loopback port that accepts connections and never answers."""
    from tests.integration.redis_server import BlackHole

    hole = BlackHole()
    yield hole
    hole.close()
