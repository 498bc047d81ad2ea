"""mTLS material and peer identity for the gossip channels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes of the run CA, this site's certificate chain and its private key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path) -> TlsConfig:
        return cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())

    @classmethod
    def for_site(cls, cert_dir: str | Path, site: str) -> TlsConfig:
        """``cert_dir/ca.pem``, ``cert_dir/<site>.pem``, ``cert_dir/<site>.key`` (python -m loco.certs)."""
        d = Path(cert_dir)
        return cls.from_files(d / "ca.pem", d / f"{site}.pem", d / f"{site}.key")


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by the run CA."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


def peer_site(context: grpc.ServicerContext) -> str | None:
    """Site name of an mTLS peer: its certificate CN when that name is also in its SAN.

    None for plaintext peers or certificates without a matching SAN.
    """
    auth = context.auth_context() or {}
    cns = [v.decode() for v in auth.get("x509_common_name", [])]
    sans = {v.decode() for v in auth.get("x509_subject_alternative_name", [])}
    for cn in cns:
        if cn in sans:
            return cn
    return None
