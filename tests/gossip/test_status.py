"""``python -m loco.status`` against real gossip nodes over mTLS on loopback, and the Status
RPC's bounds against a hostile answer.

The federation: eu, us, asia (live, one round published and pulled between eu and us, strikes
and a ban counted by eu) and sa (configured, never up). The CLI runs as a user would run it,
in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest

from loco.gossip import AuthError, GossipNode, GossipServer
from loco.gossip._pb import gossip_pb2 as pb
from loco.gossip.status import MAX_ERROR, MAX_SITES, clean, read_status
from loco.status import StatusError, main, parse_address
from tests.gossip.conftest import LAYOUT, RUN, free_port, tls_for

P = 4000
SITES = ("eu", "us", "asia")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Started nodes eu, us, asia (mTLS; sa configured, never up), after one heartbeat each,
    round 0 published by all and pulled by eu from us and by us from eu; eu counts one strike
    against us and three (a ban) against asia. Yields ``(nodes, run-CA cert root)``."""
    from loco.certs import write_run_certs

    root = tmp_path_factory.mktemp("status-certs")
    write_run_certs(root / "run", list(SITES))
    write_run_certs(root / "other", ["eu"])
    addr = {s: f"127.0.0.1:{free_port()}" for s in (*SITES, "sa")}
    nodes = {
        s: GossipNode(
            site=s,
            rank=0,
            nproc=1,
            flat_size=P,
            run_id=RUN,
            layout_hash=LAYOUT,
            listen=addr[s],
            peers={o: a for o, a in addr.items() if o != s},
            tls=tls_for(root, s),
            seed=3,
            hello_timeout_s=1.0,
            pull_timeout_s=5.0,
        )  # fmt: skip
        for s in SITES
    }
    try:
        for s, n in nodes.items():
            n.server.start()  # no heartbeat thread: the test beats once
            n.publish(0, "delta", np.full(P, SITES.index(s), np.float32))
        for n in nodes.values():
            n.membership.beat()
        eu, us = nodes["eu"], nodes["us"]
        eu.partners(0, ["eu", "us"])
        assert eu.pull("us", 0, "delta").ok and us.pull("eu", 0, "delta").ok
        eu.strike("us", 0, "test strike")
        for _ in range(3):  # strikes=3: asia is banned for ban_rounds=5 rounds after round 0
            eu.strike("asia", 0, "test strike")
        yield nodes, root
    finally:
        for n in nodes.values():
            n.close()


def status_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loco.status", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_table_names_every_site(fed):
    nodes, root = fed
    out = status_cli(nodes["eu"].server.address, "--cert-dir", str(root / "run" / "eu"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for site, live in [("eu *", "yes"), ("us", "yes"), ("asia", "yes"), ("sa", "no")]:
        row = [ln for ln in lines if f" {site} " in ln]
        assert row and f" {live} " in row[0], (site, out.stdout)
    assert "1x, until round 6" in next(ln for ln in lines if " asia " in ln)
    assert "heartbeats" in out.stdout and out.stderr == ""


def test_json_has_rounds_pairing_bytes_and_strikes(fed):
    nodes, root = fed
    out = status_cli(nodes["eu"].server.address, "--cert-dir", str(root / "run" / "eu"), "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    rows = {s["site"]: s for s in st["sites"]}
    assert list(rows) == ["eu", "asia", "sa", "us"] and rows["eu"]["me"]
    assert (st["site"], st["rank"], st["heartbeat"], st["run_id"]) == ("eu", 0, True, RUN)
    assert {s: r["live"] for s, r in rows.items()} == {"eu": True, "asia": True, "sa": False,
                                                        "us": True}  # fmt: skip
    assert [rows[s]["round"] for s in ("eu", "us", "asia", "sa")] == [0, 0, 0, -1]
    assert (st["pairing_round"], st["partners"]) == (0, ["us"])
    us, eu = rows["us"], rows["eu"]
    assert (us["paired_round"], us["paired_ok"]) == (0, True)
    assert us["bytes_recv"] == P * 4 and us["bytes_sent"] == P * 4  # eu pulled, us pulled
    assert eu["bytes_recv"] == P * 4 and eu["bytes_sent"] == P * 4  # eu's totals
    assert rows["asia"]["bytes_sent"] == rows["asia"]["bytes_recv"] == 0
    assert (us["strikes"], us["bans"], us["banned_until"]) == (1, 0, -1)
    assert (rows["asia"]["strikes"], rows["asia"]["bans"], rows["asia"]["banned_until"]) == (
        3,
        1,
        6,
    )
    assert rows["sa"]["misses"] == 1 and rows["sa"]["seen_ms_ago"] == -1
    assert rows["sa"]["last_error"] and us["last_error"] == ""
    assert us["seen_ms_ago"] >= 0 and us["nproc"] == 1


def test_any_member_bundle_asks_any_member(fed):
    """eu's bundle asks us (SITE= names the member); a plain address means the bundle's site,
    so against us it is refused as a name mismatch, exit 2."""
    nodes, root = fed
    addr = nodes["us"].server.address
    out = status_cli(f"us={addr}", "--cert-dir", str(root / "run" / "eu"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["site"] == "us"
    wrong = status_cli(addr, "--cert-dir", str(root / "run" / "eu"))
    assert wrong.returncode == 2 and _one_error_line(wrong)


def _one_error_line(out: subprocess.CompletedProcess) -> bool:
    lines = out.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("loco.status: error: ") and out.stdout == ""


@pytest.mark.parametrize("which", ["missing", "not_a_bundle", "other_ca"])
def test_wrong_cert_dir_is_one_line_exit_2(fed, tmp_path, which):
    nodes, root = fed
    cert_dir = {"missing": tmp_path / "nope", "not_a_bundle": root / "run",
                "other_ca": root / "other" / "eu"}[which]  # fmt: skip
    out = status_cli(nodes["eu"].server.address, "--cert-dir", str(cert_dir), "--timeout", "5")
    assert out.returncode == 2 and _one_error_line(out), out.stderr


def test_nobody_listening_is_one_line_exit_3(fed):
    _, root = fed
    out = status_cli(f"127.0.0.1:{free_port()}", "--cert-dir", str(root / "run" / "eu"),
                     "--timeout", "2")  # fmt: skip
    assert out.returncode == 3 and _one_error_line(out), out.stderr
    assert "cannot reach" in out.stderr


@pytest.mark.parametrize(
    "args",
    [["127.0.0.1"], ["127.0.0.1:0", "--insecure"], ["eu=127.0.0.1:99999", "--insecure"],
     ["127.0.0.1:5", "--insecure", "--cert-dir", "x"], ["127.0.0.1:5"], ["--bogus", "1:2"],
     ["127.0.0.1:5", "--insecure", "--timeout", "nan"]],
)  # fmt: skip
def test_command_mistakes_are_one_line_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("loco.status: error: ")


def test_parse_address():
    assert parse_address("127.0.0.1:29400") == ("", "127.0.0.1:29400")
    assert parse_address("us=us.example.org:50051") == ("us", "us.example.org:50051")
    assert parse_address("[::1]:7000") == ("", "[::1]:7000")
    for bad in ("us=", "host", "host:0", ":5", "a b:5", "US=h:5", "h:123456"):
        with pytest.raises(StatusError):
            parse_address(bad)


def test_non_member_certificate_is_refused(fed):
    """A certificate of the run CA whose site is not a member: PERMISSION_DENIED, counted."""
    _, root = fed
    srv = GossipServer(site="eu", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                       tls=tls_for(root, "eu"), members=["eu", "us"])  # fmt: skip
    srv.start()
    try:
        with pytest.raises(AuthError, match="PERMISSION_DENIED"):
            read_status(srv.address, tls=tls_for(root, "asia"), target="eu", timeout_s=5)
        assert srv.metrics.snapshot()["served_fail_auth"] == 1
        st = read_status(srv.address, tls=tls_for(root, "us"), target="eu", timeout_s=5)
        # a bare server (no node): its own row and its configured members, nothing live known
        assert [(s.site, s.live) for s in st.sites] == [("eu", True), ("us", None)]
    finally:
        srv.stop(grace=0)


def test_plaintext_member(capsys):
    node = GossipNode(site="eu", rank=0, nproc=1, flat_size=P, run_id=RUN, layout_hash=LAYOUT,
                      listen="127.0.0.1:0", peers={"us": f"127.0.0.1:{free_port()}"},
                      insecure=True, hello_timeout_s=0.5)  # fmt: skip
    node.server.start()
    try:
        node.membership.beat()
        main([node.server.address, "--insecure", "--json"])
        st = json.loads(capsys.readouterr().out)
        assert [(s["site"], s["live"]) for s in st["sites"]] == [("eu", True), ("us", False)]
    finally:
        node.close()


class HostileStatus:
    """A plaintext gRPC server whose Status answers ``msg`` (anything a member could send), or
    with ``abort=(code, details)`` ends the call so."""

    def __init__(self, msg: pb.StatusResponse, abort: tuple | None = None) -> None:
        def answer(req, ctx):
            if abort is not None:
                ctx.abort(*abort)
            return msg

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusResponse.SerializeToString)  # fmt: skip
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("loco.v1.Gossip", {"Status": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


def _answer(n_sites: int, **kw) -> pb.StatusResponse:
    sites = [pb.SiteStatus(site="eu" if i == 0 else f"s{i}", live=True) for i in range(n_sites)]
    return pb.StatusResponse(**{"site": "eu", "protocol_version": 1, "heartbeat": True} | kw,
                             sites=sites)  # fmt: skip


@pytest.mark.parametrize(
    "msg, why",
    [(_answer(MAX_SITES + 1), "sites listed"), (_answer(0), "sites listed"),
     (_answer(2, partners=["x"] * (MAX_SITES + 1)), "partners listed"),
     (pb.StatusResponse(site="us", protocol_version=1, sites=[pb.SiteStatus(site="eu")]),
      "not the answering site"),
     (_answer(2, run_id="x" * (5 << 20)), "larger than max"),
     (_answer(2, protocol_version=2), "protocol 2"),
     (None, "did not answer Status")],
)  # fmt: skip
def test_unusable_answer_is_exit_3(msg, why, capsys):
    abort = (grpc.StatusCode.UNIMPLEMENTED, "\x1b[2Jno\nsuch method") if msg is None else None
    hostile = HostileStatus(msg, abort)
    try:
        with pytest.raises(SystemExit) as e:
            main([hostile.address, "--insecure"])
    finally:
        hostile.server.stop(0)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3 and len(err) == 1 and why in err[0], err
    assert "\x1b" not in err[0] and len(err[0]) < 600


def test_hostile_strings_are_cut_and_printed_as_text(capsys):
    evil = "\x1b[2J[bold red]x[/]\n" + "A" * 100_000
    msg = _answer(2, run_id=evil, partners=[evil])
    msg.sites[1].site, msg.sites[1].last_error = evil, evil
    hostile = HostileStatus(msg)
    try:
        main([hostile.address, "--insecure"])
        table = capsys.readouterr().out
        main([hostile.address, "--insecure", "--json"])
        st = json.loads(capsys.readouterr().out)
    finally:
        hostile.server.stop(0)
    assert "\x1b" not in table and "[bold red]x[/]" in table and "A" * 200 not in table
    assert len(st["run_id"]) == 64 and len(st["sites"][1]["last_error"]) == MAX_ERROR
    assert st["sites"][1]["site"].startswith("?[2J[bold red]x[/]?AAA")


def test_clean():
    assert clean("eu", 64) == "eu"
    assert clean("a\x00b\nc\u202e", 64) == "a?b?c?"
    assert clean("x" * 70, 64) == "x" * 63 + "…"
