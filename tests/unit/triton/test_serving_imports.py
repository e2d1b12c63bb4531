"""Serving loads no torch: the route's and members' modules, and a request preprocessor built from the CI spec and
run on one request of every modality, leave `torch` and `transformers` out of the process (they map hundreds of
MiB into every Triton stub process, which only tokenizes and decodes), `scipy.signal` (55 MiB, needed only to
resample audio at a rate other than the spec's), and gRPC (`tritonclient.grpc`'s package maps it, ~40 MiB per stub:
the model modules import `model_config_pb2` only inside the functions that build configs)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.paths import CI_SPEC, REPO_ROOT

_PROBE = """
import json, sys
import numpy as np
import fusionrank.triton.exported, fusionrank.triton.route  # noqa: F401
import fusionrank.triton.preprocess, fusionrank.triton.pool, fusionrank.route.stages  # noqa: F401
from fusionrank.request.validation import RequestPreprocessor
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.contract.spec import load_spec
from fusionrank.contract.tensors import ITEM_INPUT, USER_HISTORY

spec = load_spec(sys.argv[1])
preparer = RequestPreprocessor(spec)
samples = warmup_samples(spec)
inputs = {ITEM_INPUT[m]: np.array([[samples[m]], [samples[m]]], dtype=object) for m in spec.modalities.enabled}
inputs[USER_HISTORY] = np.ones((2, spec.ranker.history.length), dtype=np.int64)
prepared = preparer(inputs, placeholders=True)
heavy = ("torch", "transformers", "scipy.signal", "grpc", "tritonclient.grpc")
print(json.dumps({"rows": prepared.rows, "modules": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_serving_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE, str(CI_SPEC)], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2
    assert result["modules"] == [], f"serving imported {result['modules']}"
