"""The node's end-of-run and failure-count seams: served_mark, wait_quiet, count_failure."""

from __future__ import annotations

import threading
import time

import numpy as np

from loco.dist import free_port
from loco.gossip import GossipNode

RUN, LAYOUT, P = "quiet-test", "layout-q", 64


def _pair() -> tuple[GossipNode, GossipNode]:
    ports = {"eu": free_port(), "us": free_port()}
    return tuple(
        GossipNode(
            site=s,
            rank=0,
            nproc=1,
            flat_size=P,
            run_id=RUN,
            layout_hash=LAYOUT,
            listen=f"127.0.0.1:{ports[s]}",
            peers={n: f"127.0.0.1:{ports[n]}" for n in ports if n != s},
            insecure=True,
            heartbeat=False,
            hello_timeout_s=1.0,
        ).start()  # fmt: skip
        for s in ("eu", "us")
    )  # type: ignore[return-value]


def test_wait_quiet_counts_served_pulls_since_the_mark():
    eu, us = _pair()
    try:
        assert eu.wait_quiet(0, timeout_s=0.0)  # nothing expected: at once
        mark = eu.served_mark()
        t0 = time.monotonic()
        assert not eu.wait_quiet(1, since=mark, quiet_s=0.1, timeout_s=0.3)  # nobody pulls
        assert time.monotonic() - t0 >= 0.3
        eu.publish(1, "phi", np.ones(P, np.float32))
        threading.Timer(0.2, lambda: us.pull("eu", 1, "phi")).start()
        assert eu.wait_quiet(1, since=mark, quiet_s=0.2, timeout_s=5.0)
        assert eu.served_mark() - mark == 1
    finally:
        eu.close()
        us.close()


def test_count_failure_lands_in_the_round_metrics():
    eu, us = _pair()
    try:
        eu.round_metrics()
        eu.count_failure("implausible")
        rec = eu.round_metrics()
        assert rec["fail_implausible"] == 1 and rec.get("strikes", 0) == 0
        assert "fail_implausible" not in eu.round_metrics()  # counted once
        eu.count("repaired_lattice_blocks", 3)
        assert eu.round_metrics()["repaired_lattice_blocks"] == 3
    finally:
        eu.close()
        us.close()
