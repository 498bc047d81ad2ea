"""Run CA and per-site certificate bundles for gossip mTLS.

Usage::

    python -m loco.certs --out certs --sites eu us asia [--hosts eu=eu.example.org] [--days 30]
    python -m loco.certs --out certs --ca certs/ca --sites sa     # a site added later

writes the run CA to ``certs/ca/`` (``ca.pem``, and ``ca.key``, which can sign any identity:
keep it off the sites) and one bundle per site ``certs/<site>/`` holding exactly ``ca.pem``,
``<site>.pem`` and ``<site>.key``: copy only ``certs/<site>`` to that site and set
``gossip.cert_dir`` to it there. A site certificate is ECDSA P-256 with subject CN and first DNS
SAN = the site name (plus any ``--hosts`` names), valid for client and server use. Clients dial
a site with the TLS target name set to the site name, so the SAN authenticates the server;
servers accept only certificates of the run CA whose site name is a configured member.

Private keys are created mode 0600 from their first byte, never over an existing file nor
through a symlink; bundle directories are 0700. Existing output stops the CLI (exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey
CA_DIR = "ca"  # under the output dir; never copied to a site
SITE_RE = r"[a-z][a-z0-9_-]{0,31}"  # as site.name (loco.config.SiteConfig)
MAX_DAYS = 3650
MAX_PEM = 64 << 10  # a CA certificate or key file larger than this is not one


class CertsError(Exception):
    """A mistake in the request or existing output: one line that names the fix."""


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
    """A key and a CA-signed certificate with CN = ``site`` and SAN = [site, *hosts], valid
    for ``days`` but never past the CA's own expiry."""
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
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
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


def site_bundle(out_dir: str | Path, site: str) -> Path:
    """Site ``site``'s bundle in ``write_run_certs`` output: its ``gossip.cert_dir``."""
    return Path(out_dir) / site


def ca_dir(out_dir: str | Path) -> Path:
    """The run CA (``ca.pem``, ``ca.key``) in ``write_run_certs`` output: keep it off the sites."""
    return Path(out_dir) / CA_DIR


def create_file(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a NEW file ``path`` of mode ``mode`` from its first byte, whatever
    the umask. FileExistsError when anything is at ``path``, a symlink included (never
    followed); a directory on the way is not checked (callers make their own 0700 dirs)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # open's mode was narrowed by the umask; never widened
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _private_dir(path: Path) -> None:
    """Make ``path`` a directory of mode 0700; an existing one must be a real directory."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # a symlink or a file
        raise CertsError(
            f"{path} exists and is not a directory; choose a new --out or delete it"
        ) from None
    try:
        os.fchmod(fd, 0o700)  # the umask narrowed mkdir's mode; an existing dir had its own
    finally:
        os.close(fd)


def load_ca(path: str | Path) -> tuple[PrivateKey, x509.Certificate]:
    """The CA key and certificate of ``path/ca.key``, ``path/ca.pem`` (a ``ca`` dir of
    ``write_run_certs``), checked: an EC key that matches a CA certificate still valid."""
    d = Path(path)
    blobs = []
    for name in ("ca.pem", "ca.key"):
        try:
            with open(d / name, "rb") as f:
                blobs.append(f.read(MAX_PEM + 1))
        except OSError as e:
            raise CertsError(f"--ca {d}: cannot read {name} ({e.strerror}); "
                             "give the ca dir of an earlier python -m loco.certs") from None  # fmt: skip
        if len(blobs[-1]) > MAX_PEM:
            raise CertsError(f"--ca {d}: {name} is over {MAX_PEM} bytes; not a loco.certs CA")
    try:
        cert = x509.load_pem_x509_certificate(blobs[0])
        key = serialization.load_pem_private_key(blobs[1], password=None)
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, TypeError, x509.ExtensionNotFound) as e:
        raise CertsError(f"--ca {d}: not a loco.certs CA ({e})") from None
    if not isinstance(key, PrivateKey) or not is_ca or key.public_key() != cert.public_key():
        raise CertsError(f"--ca {d}: ca.key is not the key of a CA certificate ca.pem")
    if cert.not_valid_after_utc <= _now():
        raise CertsError(f"--ca {d}: the CA expired {cert.not_valid_after_utc:%Y-%m-%d}; "
                         "make a new run CA (python -m loco.certs without --ca)")  # fmt: skip
    return key, cert


def _check_request(out: Path, sites: list[str], new_ca: bool, days: int) -> None:
    """Raise CertsError for a bad site name or days, or for any output that already exists."""
    if not 1 <= days <= MAX_DAYS:
        raise CertsError(f"--days {days}: must be 1 to {MAX_DAYS}")
    for site in sites:
        if not re.fullmatch(SITE_RE, site) or site == CA_DIR:
            raise CertsError(f"site name {site!r}: must be lowercase letters, digits, - or _ "
                             f"(as site.name), and not {CA_DIR!r}")  # fmt: skip
    if len(set(sites)) != len(sites):
        raise CertsError(f"--sites {' '.join(sites)}: a site is named twice")
    paths = [ca_dir(out) / "ca.key", ca_dir(out) / "ca.pem"] if new_ca else []
    for site in sites:
        d = site_bundle(out, site)
        paths += [d / "ca.pem", d / f"{site}.pem", d / f"{site}.key"]
    for p in paths:
        if os.path.lexists(p):
            hint = f", or add sites to that CA with --ca {p.parent}" if p.name == "ca.key" else ""
            raise CertsError(f"{p} exists; choose a new --out or delete it{hint}")


def write_run_certs(
    out_dir: str | Path,
    sites: list[str],
    hosts: dict[str, list[str]] | None = None,
    days: int = 30,
    *,
    ca: str | Path | None = None,
) -> Path:
    """Write a new run CA to ``out_dir/ca/`` (or sign with the existing one in ``ca``) and one
    bundle ``out_dir/<site>/`` = {ca.pem, <site>.pem, <site>.key} per site; return ``out_dir``.

    Raises CertsError (one line) for a bad request or when any file to write already exists;
    nothing is ever overwritten.
    """
    out = Path(out_dir)
    _check_request(out, list(sites), ca is None, days)
    if ca is None:
        ca_key, ca_cert = make_ca(days=days)
    else:
        ca_key, ca_cert = load_ca(ca)
    out.mkdir(parents=True, exist_ok=True)
    if ca is None:
        _private_dir(ca_dir(out))
        create_file(ca_dir(out) / "ca.pem", cert_pem(ca_cert), 0o644)
        create_file(ca_dir(out) / "ca.key", key_pem(ca_key), 0o600)
    for site in sites:
        key, cert = make_site_cert(ca_key, ca_cert, site, (hosts or {}).get(site, []), days)
        d = site_bundle(out, site)
        _private_dir(d)
        create_file(d / "ca.pem", cert_pem(ca_cert), 0o644)
        create_file(d / f"{site}.pem", cert_pem(cert), 0o644)
        create_file(d / f"{site}.key", key_pem(key), 0o600)
    return out


def _hosts(items: list[str], sites: list[str]) -> dict[str, list[str]]:
    hosts: dict[str, list[str]] = {}
    for item in items:
        site, _, names = item.partition("=")
        if site not in sites or not names:
            raise CertsError(f"--hosts {item!r}: expected SITE=host[,host] with SITE in --sites")
        hosts.setdefault(site, []).extend(n for n in names.split(",") if n)
    return hosts


def _fail(msg: str) -> NoReturn:
    print(f"loco.certs: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The CLI; a mistake or existing output prints one line and exits 2."""
    ap = argparse.ArgumentParser(
        prog="python -m loco.certs",
        description="make a run CA and one certificate bundle per site",
    )
    ap.add_argument("--out", required=True, help="output directory: DIR/ca and DIR/<site>")
    ap.add_argument("--sites", nargs="+", required=True, help="site names (one bundle each)")
    ap.add_argument("--hosts", nargs="*", default=[], help="extra SANs as site=host[,host]")
    ap.add_argument("--days", type=int, default=30, help="validity in days")
    ap.add_argument("--ca", help="sign with this existing CA dir (DIR/ca) instead of a new one")
    args = ap.parse_args(argv)
    try:
        out = write_run_certs(args.out, args.sites, _hosts(args.hosts, args.sites), args.days,
                              ca=args.ca)  # fmt: skip
    except CertsError as e:
        _fail(str(e))
    except FileExistsError as e:  # made between the check and the write
        _fail(f"{e.filename} exists; choose a new --out or delete it")
    except OSError as e:
        _fail(f"cannot write {e.filename}: {e.strerror}; choose a writable --out")
    ca = Path(args.ca) if args.ca else ca_dir(out)
    if not args.ca:
        print(f"run CA: {ca}/ (ca.key signs any identity: keep {ca} off the sites)")
    for site in args.sites:
        print(f"site {site}: {site_bundle(out, site)}/ (ca.pem, {site}.pem, {site}.key)")
    print(f"copy only {site_bundle(out, '<site>')} to each site and set gossip.cert_dir to it "
          f"there; add a site later with --ca {ca}")  # fmt: skip


if __name__ == "__main__":
    main()
