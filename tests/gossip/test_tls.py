"""mTLS between sites: the happy path and the certificate / membership drills."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest

from loco.gossip import AuthError, GossipClient, GossipServer, PeerUnavailable
from tests.gossip.conftest import tls_for


def _secure_site(sites, certdir, name="us", members=("eu", "us", "asia"), nproc=2, p=1000):
    site = sites(name, nproc, p, tls=tls_for(certdir, name), members=list(members))
    data = np.arange(p, dtype=np.float32)
    for s in site.servers:
        s.publish(0, "delta", data[s.lo : s.hi])
    return site, data


def test_mtls_pull_bitwise(sites, clients, certdir):
    site, data = _secure_site(sites, certdir)
    client = clients(tls=tls_for(certdir, "eu"))
    peer = client.hello(site.address, expect_site="us")
    res = client.pull(peer, 0, "delta", 100, 900)
    assert res.ok and bytes(res.data) == data[100:900].tobytes()


def test_server_cert_must_name_the_expected_site(sites, clients, certdir):
    site, _ = _secure_site(sites, certdir)
    client = clients(tls=tls_for(certdir, "eu"))
    with pytest.raises(AuthError):  # us's certificate does not say "asia"
        client.hello(site.address, expect_site="asia", timeout_s=2)


def test_client_without_certificate_is_refused(sites, certdir):
    site, _ = _secure_site(sites, certdir)
    creds = grpc.ssl_channel_credentials(root_certificates=tls_for(certdir, "eu").ca)
    opts = [("grpc.ssl_target_name_override", "us")]
    with grpc.secure_channel(site.address, creds, options=opts) as ch:
        hello = ch.unary_unary("/loco.v1.Gossip/Hello")
        with pytest.raises(grpc.RpcError) as e:
            hello(b"", timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(sites, clients, certdir):
    site, _ = _secure_site(sites, certdir)
    client = clients(tls=tls_for(certdir, "eu", ca="other"))
    with pytest.raises(AuthError, match="handshake"):
        client.hello(site.address, expect_site="us", timeout_s=3)


def test_server_certificate_from_another_ca_is_refused(sites, clients, certdir):
    site = sites("us", 1, 10, tls=tls_for(certdir, "us", ca="other"))
    client = clients(tls=tls_for(certdir, "eu"))
    with pytest.raises(AuthError, match="handshake"):
        client.hello(site.address, expect_site="us", timeout_s=3)


def test_valid_certificate_of_a_non_member_is_refused(sites, clients, certdir):
    site, _ = _secure_site(sites, certdir, members=("eu", "us"))  # asia is not a member
    client = clients(site="asia", tls=tls_for(certdir, "asia"))
    with pytest.raises(AuthError, match="PERMISSION_DENIED"):
        client.hello(site.address, expect_site="us")
    fine = clients(tls=tls_for(certdir, "eu")).hello(site.address, expect_site="us")
    res = client.pull(fine, 0, "delta", 0, 1000)
    assert not res.ok and res.cause == "auth"
    assert site.servers[0].metrics.snapshot()["served_fail_auth"] >= 1


def test_plaintext_client_refused_by_tls_server(sites, clients, certdir):
    site, _ = _secure_site(sites, certdir)
    client = clients(insecure=True)
    with pytest.raises(PeerUnavailable):
        client.hello(site.address, expect_site="us", timeout_s=2)


def test_plaintext_needs_explicit_insecure(certdir):
    with pytest.raises(ValueError, match="insecure=True"):
        GossipServer(site="us", rank=0, nproc=1, flat_size=10, run_id="r", layout_hash="l")
    with pytest.raises(ValueError, match="insecure=True"):
        GossipClient(site="eu", run_id="r", layout_hash="l")


def test_certs_cli_writes_ca_and_site_certs(tmp_path):
    from cryptography import x509

    out = subprocess.run(
        [sys.executable, "-m", "loco.certs", "--out", str(tmp_path), "--sites", "eu", "us",
         "--hosts", "eu=eu.example.org,10.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert names == ["ca/ca.key", "ca/ca.pem", "eu/ca.pem", "eu/eu.key", "eu/eu.pem",
                     "us/ca.pem", "us/us.key", "us/us.pem"]  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "eu" / "eu.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["eu", "eu.example.org"]
    assert (tmp_path / "eu" / "eu.key").stat().st_mode & 0o077 == 0
