"""Where the tests find the checkout and the CI spec (one home for both, whatever tier a test sits in)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CI_SPEC = REPO_ROOT / "tests" / "specs" / "ci.yaml"  # an overlay of the packaged default spec
