"""Drill: a site presents an expired certificate, or one of an unknown CA.

asia's certificate is replaced before the start; eu and us hold good ones of the run CA. Every
TLS handshake with asia fails (both ways), so membership never sees it live: eu and us pair
and train together, asia trains alone (every round the local step) and says why in its log.
Nothing heals here (a certificate does not renew itself); the check is that the good sites'
rounds are all complete pairs, as in a run without asia.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from loco.certs import ca_dir, site_bundle, write_run_certs
from tests.drills.common import assert_no_nan_applied, outer, run_drill
from tests.federation.test_local import check_groups_agree

SITES = ["eu", "us", "asia"]


def _expire(certs, site: str) -> None:
    """Re-sign ``site``'s certificate with the run CA, valid only in the past."""
    ca_key = serialization.load_pem_private_key((ca_dir(certs) / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((ca_dir(certs) / "ca.pem").read_bytes())
    pem = site_bundle(certs, site) / f"{site}.pem"
    old = x509.load_pem_x509_certificate(pem.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject)
         .public_key(old.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1)))  # fmt: skip
    for ext in old.extensions:
        b = b.add_extension(ext.value, ext.critical)
    cert = b.sign(ca_key, hashes.SHA256())
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _foreign(certs, site: str) -> None:
    """Replace ``site``'s key and certificate with ones of another CA."""
    other = write_run_certs(certs.parent / "other-ca", [site])
    for ext in ("pem", "key"):
        shutil.copy(site_bundle(other, site) / f"{site}.{ext}", site_bundle(certs, site))


@pytest.mark.parametrize("fault", ["expired", pytest.param("unknown_ca", marks=pytest.mark.slow)])
def test_bad_certificate(tmp_path, monkeypatch, fault):
    certs = write_run_certs(tmp_path / "drill-certs", SITES)
    (_expire if fault == "expired" else _foreign)(certs, "asia")
    # the root of the bundles: loco.local hands each site only its own certs/<site>
    ov = ["train.steps=30", "outer.H=5", "gossip.insecure=false", f"gossip.cert_dir={certs}",
          "outer.join_timeout_s=3"]  # fmt: skip
    run_drill(tmp_path, SITES, None, ov, monkeypatch)
    for s in SITES:  # each site was handed only its own bundle
        cmd = (tmp_path / s / "command.txt").read_text()
        assert f"gossip.cert_dir={site_bundle(certs, s)} " in cmd, cmd
    assert_no_nan_applied(tmp_path, SITES)
    recs = {s: outer(tmp_path, s) for s in SITES}
    # the good sites: every round a complete pair (asia is never live), identical means
    for s in ("eu", "us"):
        assert [r["n"] for r in recs[s]] == [2] * 6, recs[s]
        assert all("asia" not in r["partner"] for r in recs[s])
    assert check_groups_agree({s: recs[s] for s in ("eu", "us")}) == 2 * 6
    # asia trained alone, every round the local step
    assert [r["n"] for r in recs["asia"]] == [1] * 6
    log = (tmp_path / "asia" / "worker.log").read_text()
    assert "sites live after" in log  # it said it started without the others
