"""The admin doors' policy without a server: flags and key checks (the served doors:
tests/integration/test_doors.py)."""

from __future__ import annotations

import pytest

from fusionrank.server.doors import DoorError, GrpcTls, check_admin_key
from fusionrank.server.launcher import policy_args


def test_policy_flags_and_key_checks(tmp_path):
    args = policy_args(["rank", "fusion_ranker"], "k-1")
    assert args[:3] == ["--model-control-mode=explicit", "--load-model=rank", "--load-model=fusion_ranker"]
    assert "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:fusionrank-admin-key=k-1" in args
    assert not any("ssl" in a for a in args)
    for bad in ("", "a:b", "a,b", "a=b", "with space"):
        with pytest.raises(DoorError, match="admin key"):
            check_admin_key(bad)
    (tmp_path / "server.crt").write_text("pem")
    with pytest.raises(DoorError, match="server key .*missing.key is not a file"):
        GrpcTls(tmp_path / "server.crt", tmp_path / "missing.key")
