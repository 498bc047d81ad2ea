"""A site whose ranks span two machines: two network namespaces joined by veth are two hosts with
real addresses; site eu runs rank 0 on host a and rank 1 on host b (torchrun, c10d rendezvous),
its partner us runs on host a. The same site on one host is the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loco.dist import free_port
from loco.gossip.netem import NetnsLink, netns_available
from loco.gossip.rank_address import collective_interface, rank_binds, rank_host, route_source
from tests.workers import ROOT, train_losses

pytestmark = pytest.mark.skipif(bool(netns_available()), reason=netns_available() or "ok")

TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.seq_len=32",
        "train.eval_every=1000", "train.log_every=1", "train.warmup_steps=2", "train.lr=3e-3",
        "train.progress=false", "train.tensorboard=false", "train.steps=12", "outer.H=4",
        "gossip.heartbeat_s=0.3", "gossip.pull_timeout_s=30", "outer.join_timeout_s=60"]  # fmt: skip
STEPS, ROUNDS = 12, 3


def _certs(tmp: Path) -> Path:
    out = tmp / "certs"
    subprocess.run([sys.executable, "-m", "loco.certs", "--out", str(out), "--sites", "eu", "us"],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)  # fmt: skip
    return out


def _start(prefix: list[str], args: list[str], log: Path, env: dict | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("LOCO_DEBUG", None)
    return subprocess.Popen([*prefix, *args], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def _wait(procs: dict, tmp: Path) -> None:
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            rc = "timeout"
        assert rc == 0, f"{name}: {rc}\n{(tmp / f'{name}.log').read_text()[-3000:]}"


def _federation(link: NetnsLink, tmp: Path, certs: Path, two_hosts: bool) -> Path:
    """Run us (host a) and eu (ranks on hosts a and b, or both on a); eu's run directory."""
    tmp.mkdir(parents=True)
    a, b = link.exec_prefix(link.ns_a), link.exec_prefix(link.ns_b)
    eu, us = f"{link.ip_a}:{free_port()}", f"{link.ip_a}:{free_port()}"
    py = [sys.executable, "-m"]
    procs = {"us": _start(a, [*py, "loco.worker", "+site=us", f"site.listen={us}",
                              f"site.peers=[eu={eu}]", f"gossip.cert_dir={certs / 'us'}",
                              "train.batch_size=8", *TINY, f"hydra.run.dir={tmp / 'us'}"],
                          tmp / "us.log")}  # fmt: skip
    site = ["loco.worker", "+site=eu", f"site.listen={eu}", f"site.peers=[us={us}]",
            f"gossip.cert_dir={certs / 'eu'}", "train.batch_size=4", *TINY,
            f"hydra.run.dir={tmp / 'eu'}"]  # fmt: skip
    if two_hosts:
        rdzv = f"{link.ip_a}:{free_port()}"
        for node, (pre, ip) in enumerate(((a, link.ip_a), (b, link.ip_b))):
            run = ["torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", "--rdzv-id=eu",
                   f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr={ip}", "-m"]  # fmt: skip
            # no GLOO_SOCKET_IFNAME: loco picks the interface that routes to the rendezvous
            procs[f"eu{node}"] = _start(pre, [*py, *run, *site], tmp / f"eu{node}.log")
    else:
        procs["eu0"] = _start(a, [*py, *site, "site.nproc=2"], tmp / "eu0.log")
    _wait(procs, tmp)
    return tmp / "eu"


def test_route_source_and_rank_host_on_loopback():
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert rank_host("127.0.0.1:29400") == "127.0.0.1"
    assert rank_host("127.0.0.1:29400", advertise="10.9.8.7") == "10.9.8.7"
    assert route_source("no-such-host.invalid") is None
    assert collective_interface("127.0.0.1") is None  # loopback: gloo's own choice stands


def test_rank_binds_puts_the_site_port_on_the_site_machine():
    """Ranks on the site's machine bind its host; the lowest of them its port, the rest
    port + rank; a site whose listen host is on none of its machines is refused."""
    site = "127.0.0.1:29400"
    gather = lambda flags: lambda x: flags  # noqa: E731 (every rank's answer, as all_gather)
    assert rank_binds(site, 0, "", gather([True, True])) == "127.0.0.1:29400"
    assert rank_binds(site, 1, "", gather([True, True])) == "127.0.0.1:29401"
    # rank 0 on another machine (a rendezvous may order nodes so): rank 1 serves the site port
    assert rank_binds(site, 1, "", gather([False, True])) == "127.0.0.1:29400"
    assert rank_binds(site, 0, "10.1.2.3", gather([False, True])) == "10.1.2.3:29400"
    with pytest.raises(ValueError, match="no rank of this site runs on the machine"):
        rank_binds(site, 0, "", gather([False, False]))


def test_site_across_two_hosts_matches_one_host(tmp_path):
    """torchrun puts eu's rank 1 on host b: it binds host b's address, Hello advertises it, the
    partner pulls rank 1's range from host b, and eu's losses equal the one-host run's."""
    certs = _certs(tmp_path)
    with NetnsLink(rate_mbit=0) as link:
        two = _federation(link, tmp_path / "two", certs, two_hosts=True)
        one = _federation(link, tmp_path / "one", certs, two_hosts=False)
    s2 = json.loads((two / "summary.json").read_text())
    s1 = json.loads((one / "summary.json").read_text())
    assert s2["nproc"] == s1["nproc"] == 2 and s2["rounds"] == s1["rounds"] == ROUNDS
    # each rank's server sent its half of every round's payload to us: both hosts served
    lo_half = min(s2["rank_bytes_sent"])
    assert lo_half > 0.4 * s2["bytes_sent"], s2["rank_bytes_sent"]
    a, b = train_losses(two), train_losses(one)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:  # fp32 all-reduce of two ranks: the same sums in the same order
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    assert s2["final_params_crc32"] == s1["final_params_crc32"]
