"""Shared helpers for gossip tests: sites of real servers on loopback, cert dirs."""

from __future__ import annotations

import os

import pytest

from loco.certs import write_run_certs
from loco.gossip import GossipClient, GossipServer, TlsConfig
from loco.testing.gossip_faults import FaultyServer

RUN = "run-test"
LAYOUT = "layout-abc"


class Site:
    """All rank servers of one site, on loopback ports chosen by the OS; with ``fault=`` (a
    ``ServerFault``, shared by every rank) they are ``FaultyServer``s."""

    def __init__(self, name: str, nproc: int, flat_size: int, **kw) -> None:
        self.name, self.nproc, self.flat_size = name, nproc, flat_size
        kw.setdefault("run_id", RUN)
        kw.setdefault("layout_hash", LAYOUT)
        if "tls" not in kw:
            kw.setdefault("insecure", True)
        server = GossipServer if "fault" not in kw else FaultyServer
        self.servers = [
            server(site=name, rank=r, nproc=nproc, flat_size=flat_size, **kw) for r in range(nproc)
        ]

    def start(self) -> Site:
        for s in self.servers:
            s.start()
        addrs = [s.address for s in self.servers]
        for s in self.servers:
            s.set_rank_addresses(addrs)
        return self

    @property
    def address(self) -> str:
        return self.servers[0].address

    def stop(self) -> None:
        for s in self.servers:
            s.stop(grace=0)


@pytest.fixture
def sites():
    made: list[Site] = []

    def make(name: str, nproc: int, flat_size: int, **kw) -> Site:
        site = Site(name, nproc, flat_size, **kw).start()
        made.append(site)
        return site

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def clients():
    made: list[GossipClient] = []

    def make(**kw) -> GossipClient:
        kw.setdefault("site", "eu")
        kw.setdefault("run_id", RUN)
        kw.setdefault("layout_hash", LAYOUT)
        if "tls" not in kw:
            kw.setdefault("insecure", True)
        kw.setdefault("timeout_s", 10.0)
        c = GossipClient(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def certdir(tmp_path_factory):
    """A run CA with certs for eu, us, asia; plus a foreign CA with its own eu/us certs."""
    d = tmp_path_factory.mktemp("certs")
    write_run_certs(d / "run", ["eu", "us", "asia"])
    write_run_certs(d / "other", ["eu", "us", "mallory"])
    return d


def tls_for(certdir, site: str, ca: str = "run") -> TlsConfig:
    return TlsConfig.for_site(certdir / ca / site, site)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class PeerProcess:
    """``python -m loco.gossip.peer`` in a child process (a real process to kill)."""

    def __init__(self, *args: str, prefix: list[str] | None = None) -> None:
        import json
        import subprocess
        import sys

        cmd = [*(prefix or []), sys.executable, "-m", "loco.gossip.peer", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer failed to start: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.addresses: list[str] = self.info["addresses"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def peer_process():
    made: list[PeerProcess] = []

    def make(*args: str, **kw) -> PeerProcess:
        p = PeerProcess(*args, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
