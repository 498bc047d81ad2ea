"""The WAN proxy's jitter and loss, through real sockets; the wan/ presets compose."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from loco.config import compose
from loco.gossip.netem import MSS, DelayProxy


def _echo_server() -> tuple[socket.socket, str]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def _rtts(addr: str, n: int, size: int = 64) -> list[float]:
    host, _, port = addr.rpartition(":")
    out = []
    with socket.create_connection((host, int(port))) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.monotonic()
            c.sendall(b"x" * size)
            got = 0
            while got < size:
                got += len(c.recv(1 << 16))
            out.append(time.monotonic() - t0)
    return out


def test_jitter_spreads_rtt_within_bounds():
    srv, up = _echo_server()
    with DelayProxy(up, delay_s=0.02, jitter_s=0.01, seed=1) as proxy:
        rtts = _rtts(proxy.address, 30)
    srv.close()
    # one proxy on the path: request and echo each draw 20 +- 10 ms, so an RTT is never under
    # 20 ms; above 60 ms only by scheduling delay (up to ~0.1 s on a loaded 2-core box)
    assert min(rtts) >= 0.02 - 1e-3 and max(rtts) < 0.06 + 0.1, rtts
    assert statistics.pstdev(rtts) > 2e-3  # really drawn (a fixed delay spreads far less)


def test_loss_stalls_tcp_by_retransmission_timeouts():
    srv, up = _echo_server()
    payload = 400 * MSS  # ~580 KB: ~4 lost packets expected each way at 0.5%
    with DelayProxy(up, delay_s=0.005, loss=0.005, seed=3) as proxy:
        host, _, port = proxy.address.rpartition(":")
        t0 = time.monotonic()
        with socket.create_connection((host, int(port))) as c:
            threading.Thread(target=c.sendall, args=(b"y" * payload,), daemon=True).start()
            got = 0
            while got < payload:
                got += len(c.recv(1 << 16))
        took = time.monotonic() - t0
        stalls, lost = proxy.stalls, proxy.lost_packets
    srv.close()
    assert got == payload  # TCP: loss is delay, never missing bytes
    assert stalls >= 1 and lost >= stalls
    # each stall idles the direction's link for one RTO (200 ms): they add up, at least along
    # the longer of the two directions
    assert took >= 0.2 * stalls / 2 * 0.9, (took, stalls)


@pytest.mark.parametrize(
    "name,rtt,mbit,loss", [("transatlantic", 80, 1000, 0.0), ("bad", 200, 50, 0.01)]
)
def test_wan_presets(name, rtt, mbit, loss):
    w = compose([f"wan={name}"], need_site=False).wan
    assert (w.rtt_ms, w.bandwidth_mbit, w.loss) == (rtt, mbit, loss)
