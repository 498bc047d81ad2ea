"""Run CA and per-site certificates for gossip mTLS.

Usage::

    python -m loco.certs --out certs/ --sites eu us asia [--hosts eu=eu.example.org] [--days 30]

writes ``ca.pem`` (the run CA; ``ca.key`` is its key, keep it off the sites), and for each
site ``<site>.pem`` / ``<site>.key``: an ECDSA P-256 certificate whose subject CN and first
DNS SAN are the site name (plus any extra ``--hosts`` names), valid for client and server use.
Clients dial a site with the TLS target name set to the site name, so the site name in the SAN
authenticates the server; servers accept only certificates of the run CA whose site name is a
configured member.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(name: str = "loco-run-ca", days: int = 30) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_site_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    site: str,
    hosts: list[str] | tuple[str, ...] = (),
    days: int = 30,
) -> tuple[PrivateKey, x509.Certificate]:
    """A key and a CA-signed certificate with CN = ``site`` and SAN = [site, *hosts]."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(site)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(site))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def write_run_certs(
    out_dir: str | Path,
    sites: list[str],
    hosts: dict[str, list[str]] | None = None,
    days: int = 30,
) -> Path:
    """Write ca.pem/ca.key and <site>.pem/<site>.key for every site into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(days=days)
    _write(out / "ca.pem", cert_pem(ca_cert))
    _write(out / "ca.key", key_pem(ca_key), private=True)
    for site in sites:
        key, cert = make_site_cert(ca_key, ca_cert, site, (hosts or {}).get(site, []), days)
        _write(out / f"{site}.pem", cert_pem(cert))
        _write(out / f"{site}.key", key_pem(key), private=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m loco.certs", description="make a run CA and site certs"
    )
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--sites", nargs="+", required=True, help="site names (one cert each)")
    ap.add_argument("--hosts", nargs="*", default=[], help="extra SANs as site=host[,host]")
    ap.add_argument("--days", type=int, default=30, help="validity in days")
    args = ap.parse_args(argv)
    hosts: dict[str, list[str]] = {}
    for item in args.hosts:
        site, _, names = item.partition("=")
        if site not in args.sites or not names:
            ap.error(f"--hosts {item!r}: expected SITE=host[,host] with SITE in --sites")
        hosts.setdefault(site, []).extend(n for n in names.split(",") if n)
    out = write_run_certs(args.out, args.sites, hosts, args.days)
    print(f"wrote run CA and {len(args.sites)} site certificates to {out}")


if __name__ == "__main__":
    main()
