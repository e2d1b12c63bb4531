"""Who may use what on a served Triton: the admin key that opens the restricted APIs, and TLS for gRPC.

Triton's restricted-protocol options close API groups to callers without a header carrying a key
(`--grpc-restricted-protocol=<groups>:<header>=<key>`, `--http-restricted-api=...`). Closed here: loading and
unloading models (explicit model control runs code from the repository), registering shared memory (a caller could
map any region it names), tracing and logging settings. Inference, health and metadata stay open.

Triton takes the key only on its command line, so it is visible to `ps` on the host (as /proc/<pid>/cmdline, to
any user of a host that does not mount /proc with hidepid): run Triton alone in its container or pod, whose process
namespace other tenants do not share. fusionrank never writes the key to its own logs.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fusionrank.contract.admin import ADMIN_HEADER, check_admin_key
from fusionrank.contract.errors import DoorError

ENV_ADMIN_KEY = "FUSIONRANK_ADMIN_KEY"  # where `fusionrank serve` and the image's entrypoint read the key
ENV_TLS_DIR = "FUSIONRANK_GRPC_TLS_DIR"  # a folder laid out as TLS_FILES (a mounted Kubernetes TLS Secret)
TLS_FILES = ("tls.crt", "tls.key", "client-ca.crt")  # certificate, key, and (optional) the CA of mutual TLS
# Triton's API groups that need the key. Statistics and model config stay open: they reveal what metadata already
# does, and dashboards read statistics.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
# With gRPC on TLS, Triton's HTTP endpoint (which has no TLS) would still take inference in plaintext: these groups
# need the key over HTTP too, leaving health open for the probes.
HTTP_PLAINTEXT_APIS = ("inference", "metadata", "model-config", "statistics")


def new_admin_key() -> str:
    """A random key (128 bits), for a server whose restricted APIs nobody is meant to use."""
    return secrets.token_urlsafe(16)


def admin_key_from_env(environ: dict[str, str] | None = None) -> str | None:
    """$FUSIONRANK_ADMIN_KEY, or None when unset or empty."""
    key = (environ if environ is not None else os.environ).get(ENV_ADMIN_KEY, "").strip()
    return key or None


def restricted_args(key: str, tls: bool = False) -> list[str]:
    """Triton's flags closing RESTRICTED_APIS (and, with gRPC on TLS, HTTP's plaintext inference) without `key`."""
    http = RESTRICTED_APIS + (HTTP_PLAINTEXT_APIS if tls else ())
    return [f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={check_admin_key(key)}",
            f"--http-restricted-api={','.join(http)}:{ADMIN_HEADER}={key}"]


@dataclass(frozen=True)
class GrpcTls:
    """TLS for Triton's gRPC endpoint: its certificate and key (PEM); with `client_ca`, mutual TLS (callers must
    present a certificate signed by that CA)."""

    server_cert: Path
    server_key: Path
    client_ca: Path | None = None

    def __post_init__(self):
        for field in ("server_cert", "server_key", "client_ca"):
            path = getattr(self, field)
            if path is None:
                continue
            object.__setattr__(self, field, Path(path).resolve())
            if not getattr(self, field).is_file():
                raise DoorError(f"TLS {field.replace('_', ' ')} {path} is not a file")

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def args(self) -> list[str]:
        """Triton's flags for this TLS setting."""
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.server_cert}", f"--grpc-server-key={self.server_key}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args

    def describe(self) -> str:
        return "mutual TLS" if self.mutual else "TLS"

    @classmethod
    def from_dir(cls, folder: Path | str) -> GrpcTls | None:
        """TLS from a folder holding `tls.crt` and `tls.key` (and `client-ca.crt` for mutual TLS); None when it holds
        neither (a Secret that was not created: plaintext), DoorError when it holds only one."""
        cert, key, client_ca = (Path(folder) / name for name in TLS_FILES)
        if not cert.is_file() and not key.is_file():
            return None
        if not (cert.is_file() and key.is_file()):
            raise DoorError(f"TLS folder {folder} holds only one of {TLS_FILES[0]} and {TLS_FILES[1]}")
        return cls(cert, key, client_ca if client_ca.is_file() else None)
