"""``python -m loco.certs``: per-site bundles, the CA key kept apart, keys created safely."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from loco.certs import ca_dir, create_file, site_bundle, write_run_certs
from loco.federation import Federation, site_args
from loco.gossip import GossipClient, GossipServer, TlsConfig

SITES = ["eu", "us", "asia"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loco.certs", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_each_bundle_holds_only_its_site_and_the_ca_key_only_ca_dir(tmp_path):
    out = write_run_certs(tmp_path / "certs", SITES)
    assert out == tmp_path / "certs"
    assert sorted(p.name for p in out.iterdir()) == sorted([*SITES, "ca"])
    assert sorted(p.name for p in ca_dir(out).iterdir()) == ["ca.key", "ca.pem"]
    ca_pem = (ca_dir(out) / "ca.pem").read_bytes()
    for s in SITES:
        b = site_bundle(out, s)
        assert b == out / s
        assert sorted(p.name for p in b.iterdir()) == sorted(["ca.pem", f"{s}.pem", f"{s}.key"])
        assert (b / "ca.pem").read_bytes() == ca_pem
        cert = x509.load_pem_x509_certificate((b / f"{s}.pem").read_bytes())
        assert cert.issuer == x509.load_pem_x509_certificate(ca_pem).subject
    keys = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.key"))
    assert keys == sorted(["ca/ca.key", *(f"{s}/{s}.key" for s in SITES)])


def test_keys_0600_and_bundle_dirs_0700_even_with_umask_0(tmp_path):
    old = os.umask(0)
    try:
        out = write_run_certs(tmp_path / "certs", SITES)
    finally:
        os.umask(old)
    for d in [ca_dir(out), *(site_bundle(out, s) for s in SITES)]:
        assert _mode(d) == 0o700, d
    for k in out.rglob("*.key"):
        assert _mode(k) == 0o600, k
    for c in out.rglob("*.pem"):
        assert _mode(c) == 0o644, c


def test_create_file_never_follows_a_symlink_nor_overwrites(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link, dangling = tmp_path / "k.key", tmp_path / "d.key"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "made-through-the-link")
    for p in (link, dangling, target):
        with pytest.raises(FileExistsError):
            create_file(p, b"secret")
    assert target.read_bytes() == b"precious"
    assert not (tmp_path / "made-through-the-link").exists()
    old = os.umask(0o277)  # would leave 0400 without the explicit chmod
    try:
        create_file(tmp_path / "new.key", b"secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new.key") == 0o600
    assert (tmp_path / "new.key").read_bytes() == b"secret"


@pytest.mark.parametrize("what", ["file", "symlink"])
def test_cli_exits_2_on_an_existing_key_and_touches_nothing(tmp_path, what):
    out = tmp_path / "certs"
    (out / "eu").mkdir(parents=True)
    target = tmp_path / "elsewhere.key"
    target.write_bytes(b"someone else's key")
    key = out / "eu" / "eu.key"
    if what == "file":
        key.write_bytes(b"old key")
    else:
        key.symlink_to(target)
    p = _cli("--out", str(out), "--sites", "eu", "us")
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == [f"loco.certs: error: {key} exists; choose a new --out or delete it"]
    assert target.read_bytes() == b"someone else's key"
    assert key.is_symlink() if what == "symlink" else key.read_bytes() == b"old key"
    assert sorted(p.name for p in out.iterdir()) == ["eu"]  # nothing written before the check
    assert sorted(p.name for p in (out / "eu").iterdir()) == ["eu.key"]


def test_cli_rejects_bad_site_names_before_writing(tmp_path):
    for bad in ("../x", "ca", "EU"):
        p = _cli("--out", str(tmp_path / "certs"), "--sites", "eu", bad)
        assert p.returncode == 2 and "site name" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "certs").exists() and not (tmp_path / "x").exists()


def _hello(server_dir: Path, server: str, client_dir: Path, client: str) -> str:
    """``client`` (its bundle) says Hello over mTLS to a ``server`` site (its bundle)."""
    srv = GossipServer(site=server, rank=0, nproc=1, flat_size=10, run_id="r", layout_hash="l",
                       tls=TlsConfig.for_site(server_dir, server), members=[server, client])  # fmt: skip
    srv.start()
    try:
        srv.set_rank_addresses([srv.address])
        c = GossipClient(site=client, run_id="r", layout_hash="l",
                         tls=TlsConfig.for_site(client_dir, client), timeout_s=10)  # fmt: skip
        try:
            return c.hello(srv.address, expect_site=server, timeout_s=10).site
        finally:
            c.close()
    finally:
        srv.stop(grace=0)


def test_two_bundles_connect_and_a_site_added_later_with_ca_too(tmp_path):
    out = write_run_certs(tmp_path / "certs", ["eu", "us"])
    assert _hello(site_bundle(out, "us"), "us", site_bundle(out, "eu"), "eu") == "us"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = _cli("--out", str(out), "--ca", str(ca_dir(out)), "--sites", "sa")
    assert p.returncode == 0, p.stderr
    assert {q: q.read_bytes() for q in before} == before  # nothing rewritten
    assert sorted(q.name for q in site_bundle(out, "sa").iterdir()) == [
        "ca.pem",
        "sa.key",
        "sa.pem",
    ]
    assert _hello(site_bundle(out, "eu"), "eu", site_bundle(out, "sa"), "sa") == "eu"
    bad = _cli("--out", str(tmp_path / "x"), "--ca", str(site_bundle(out, "eu")), "--sites", "y")
    assert bad.returncode == 2 and "ca.key" in bad.stderr, bad.stderr  # a bundle is not a CA


def test_local_hands_each_site_only_its_own_bundle(tmp_path):
    fed = Federation(tmp_path, SITES, [], nproc=1, insecure=False, method="noloco")
    dirs = fed._cert_dirs()
    assert dirs == {s: tmp_path / "certs" / s for s in SITES}
    ports = dict.fromkeys(SITES, 41000)
    for i, s in enumerate(SITES):
        args = site_args(s, i, SITES, ports, ["gossip.cert_dir=/elsewhere"], dirs[s], threads=1)
        assert [a for a in args if "cert_dir" in a] == [f"gossip.cert_dir={tmp_path / 'certs' / s}"]
    ca = (tmp_path / "certs" / "ca" / "ca.key").read_bytes()
    assert fed._cert_dirs() == dirs and (tmp_path / "certs" / "ca" / "ca.key").read_bytes() == ca
    given = Federation(tmp_path / "run2", SITES, [f"gossip.cert_dir={tmp_path / 'certs'}"],
                       nproc=1, insecure=False, method="noloco")  # fmt: skip
    assert given._cert_dirs() == dirs and not (tmp_path / "run2" / "certs").exists()
