"""The admin key on the wire: the header that carries it, what a usable key is, and the metadata a caller sends.

Servers close their restricted APIs to callers without this header (`fusionrank.server.doors`); clients send it
(`clients`). Both read it here, so neither imports the other.
"""

from __future__ import annotations

from fusionrank.contract.errors import DoorError

ADMIN_HEADER = "fusionrank-admin-key"  # the header that carries the key; over gRPC Triton expects it prefixed:
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def check_admin_key(key: str) -> str:
    """`key` if Triton can parse it out of `<groups>:<header>=<key>` and send it in a header, else DoorError."""
    if not key or any(c in key for c in ",:= \t\r\n") or not key.isprintable():
        raise DoorError("the admin key must be non-empty printable text without spaces, ',', ':' or '='")
    return key


def grpc_admin_header(key: str) -> dict[str, str]:
    """gRPC metadata that opens the restricted APIs (Triton prefixes restricted gRPC header keys)."""
    return {GRPC_HEADER_PREFIX + ADMIN_HEADER: key}


def http_admin_header(key: str) -> dict[str, str]:
    """HTTP header that opens the restricted APIs."""
    return {ADMIN_HEADER: key}
