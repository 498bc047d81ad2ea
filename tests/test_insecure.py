"""Insecure (plaintext) gossip is loud and explicit: loopback only unless a second key says
otherwise, a warning line at every site's start, and ``gossip_insecure`` in every summary."""

from __future__ import annotations

import json
import socket

import pytest

from loco.certs import write_run_certs
from loco.config import ConfigError, compose
from loco.gossip import GossipNode, GossipServer
from loco.gossip.server import is_loopback_host
from tests.workers import run_worker

PUBLIC = ["+site=eu", "gossip.insecure=true", "site.listen=0.0.0.0:29999"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plaintext_on_a_public_address_needs_insecure_public():
    with pytest.raises(ConfigError) as e:
        compose(PUBLIC)
    msg = str(e.value)
    assert "\n" not in msg and "gossip.insecure_public=true" in msg and "0.0.0.0" in msg
    assert compose([*PUBLIC, "gossip.insecure_public=true"]).gossip.insecure_public is True


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost"])
def test_plaintext_on_loopback_composes(host):
    cfg = compose(["+site=eu", "gossip.insecure=true", f"site.listen={host}:29999"])
    assert cfg.gossip.insecure and not cfg.gossip.insecure_public


def test_mtls_on_a_public_address_composes():
    assert compose(["+site=eu", "site.listen=0.0.0.0:29999"]).gossip.insecure is False


def test_worker_refuses_public_plaintext_before_any_work(tmp_path):
    p = run_worker(PUBLIC, tmp_path / "run", timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("loco: error: "), p.stderr
    assert "gossip.insecure_public" in lines[0]
    assert not (tmp_path / "run").exists(), "the run must stop before any work"


def test_loopback_hosts():
    for h in ("127.0.0.1", "127.255.0.9", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert is_loopback_host(h), h
    for h in ("0.0.0.0", "", "::", "[::]", "10.0.0.1", "eu.example.org", "128.0.0.1"):
        assert not is_loopback_host(h), h


def test_server_refuses_public_plaintext_without_the_flag():
    kw = dict(site="eu", rank=0, nproc=1, flat_size=10, run_id="r", layout_hash="l",
              insecure=True)  # fmt: skip
    for listen in ("0.0.0.0:0", "[::]:0", "10.0.0.1:0"):
        with pytest.raises(ValueError, match="allow_public_plaintext"):
            GossipServer(listen=listen, **kw)
    GossipServer(listen="0.0.0.0:0", allow_public_plaintext=True, **kw)  # constructed, not bound
    GossipServer(listen="127.0.0.1:0", **kw)


def test_node_passes_insecure_public_to_its_server():
    kw = dict(site="eu", rank=0, nproc=1, flat_size=10, run_id="r", layout_hash="l",
              listen="0.0.0.0:0", peers={}, insecure=True, heartbeat=False)  # fmt: skip
    with pytest.raises(ValueError, match="allow_public_plaintext"):
        GossipNode(**kw)
    GossipNode(insecure_public=True, **kw).client.close()


@pytest.mark.parametrize("insecure", [True, False], ids=["plaintext", "mtls"])
def test_site_start_line_and_summary_say_whether_gossip_is_plaintext(tmp_path, insecure):
    if insecure:
        how = ["gossip.insecure=true"]
    else:
        write_run_certs(tmp_path / "certs", ["eu"])
        how = [f"gossip.cert_dir={tmp_path / 'certs' / 'eu'}"]
    args = ["+site=eu", *how, "site.peers=[]", f"site.listen=127.0.0.1:{_free_port()}",
            "train.steps=2", "outer.H=1", "train.seq_len=32", "train.batch_size=2",
            "train.eval_every=1000", "train.eval_batches=1", "train.progress=false",
            "outer.join_timeout_s=0"]  # fmt: skip
    p = run_worker(args, tmp_path / "run", timeout=120)
    assert p.returncode == 0, p.stderr
    starts = [ln for ln in p.stderr.splitlines() if ln.startswith("loco[eu] ")]
    loud = "gossip is PLAINTEXT and unauthenticated"
    if insecure:
        assert loud in starts[0], p.stderr  # the very first line of the site
    else:
        assert loud not in p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gossip_insecure"] is insecure
