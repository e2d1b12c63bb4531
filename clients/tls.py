"""TLS for the ranking clients' gRPC channels: the CA to trust, and for mutual TLS the client's own certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.errors import ClientError


@dataclass(frozen=True)
class ClientTls:
    """PEM files for a TLS channel. `root_certificates`: the CA that signed the server's certificate (None: the
    system's trust store); `private_key` + `certificate_chain`: this client's certificate, for servers that require
    one (mutual TLS); `server_name`: the name to check the server's certificate against when it differs from the
    host in the URL (e.g. calls to pod IPs behind a certificate for the service's DNS name)."""

    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ClientError("ClientTls: private_key and certificate_chain go together (mutual TLS)")
        for field in ("root_certificates", "private_key", "certificate_chain"):
            path = getattr(self, field)
            if path is not None and not Path(path).is_file():
                raise ClientError(f"ClientTls.{field}: {path} does not exist")

    def channel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for tritonclient's `InferenceServerClient` (sync or aio): credentials read now, and
        tritonclient's default channel options plus the name override when one is set."""
        import grpc
        from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        creds = grpc.ssl_channel_credentials(root_certificates=read(self.root_certificates),
                                             private_key=read(self.private_key),
                                             certificate_chain=read(self.certificate_chain))
        if self.server_name is None:
            return {"creds": creds}
        # channel_args replaces tritonclient's defaults, so they are repeated here.
        keepalive = KeepAliveOptions()
        args = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                ("grpc.ssl_target_name_override", self.server_name)]
        return {"creds": creds, "channel_args": args}
