"""WAN emulation for tests and benchmarks: a user-space delay/rate TCP proxy and netns links.

``DelayProxy`` forwards TCP connections to an upstream address, delaying every byte by
``delay_s`` per direction (RTT = 2 x delay) and serializing it at ``rate_bps`` (a link model:
departure = max(now, link free) + size / rate, delivery = departure + delay). Its queue is
bounded (``buffer_bytes`` per direction), beyond which it stops reading: back-pressure.

Jitter: each chunk's one-way delay is drawn uniformly from ``delay_s +- jitter_s``; delivery
stays in order (a chunk never overtakes the one before it, as on one TCP connection).

Loss: the proxy carries TCP streams, so bytes are never lost; what a lossy path does to TCP is
emulated instead. Every chunk is cut into packets of ``MSS`` bytes, each lost with probability
``loss``; a lost packet is retransmitted after a timeout ``RTO = max(200 ms, RTT)`` (Linux's
minimum RTO): that chunk (and, in order, everything behind it) is delivered ``RTO`` later, and the
direction's link sends nothing for that ``RTO`` (throughput falls to about
``MSS / (loss x RTO)``: ~5.8 Mbit/s at 1% and 200 ms). Not modelled: fast retransmit (cheaper
than a timeout) and the congestion window's slow regrowth afterwards (dearer).

    python -m loco.gossip.netem proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:5000 \
        --delay-ms 50 --rate-mbit 100

prints ``{"address": "127.0.0.1:PORT"}`` and forwards until killed.

``NetnsLink`` (root only) creates two network namespaces joined by a veth pair with a tbf
rate limit on both ends, and removes them on exit. It is the only code here that touches the
host's network configuration, and only the namespaces it created.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import subprocess
import threading
import time

MSS = 1448  # TCP payload bytes per packet (1500-byte MTU, timestamps on)
MIN_RTO_S = 0.2  # Linux's minimum retransmission timeout


class DelayProxy:
    """Asyncio TCP proxy adding one-way ``delay_s`` (+- ``jitter_s``), a ``rate_bps`` (bits/s,
    0 = unlimited) and TCP-like stalls for a packet ``loss`` rate (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        *,
        listen: str = "127.0.0.1:0",
        delay_s: float = 0.05,
        rate_bps: float = 0.0,
        jitter_s: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        buffer_bytes: int = 4 << 20,
    ) -> None:
        if jitter_s < 0 or not 0 <= loss < 1:
            raise ValueError(f"jitter_s={jitter_s} must be >= 0 and loss={loss} in [0, 1)")
        self.upstream, self.listen = upstream, listen
        self.delay_s, self.rate_bps, self.buffer_bytes = delay_s, rate_bps, buffer_bytes
        self.jitter_s, self.loss = jitter_s, loss
        self.rto_s = max(MIN_RTO_S, 2 * delay_s)
        self._rng = random.Random(seed)
        self.lost_packets = self.stalls = 0
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._link_free = {"up": 0.0, "down": 0.0}  # one link per direction, shared by all conns
        self._tasks: set[asyncio.Task] = set()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = 0
        ready = asyncio.Event()
        room = asyncio.Event()
        room.set()
        done = False
        last_at = 0.0

        async def deliver() -> None:
            nonlocal queued
            while True:
                while not queue:
                    if done:
                        writer.close()
                        return
                    ready.clear()
                    await ready.wait()
                at, data = queue.popleft()
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                if queued < self.buffer_bytes:
                    room.set()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                await room.wait()
                data = await reader.read(64 << 10)
                if not data:
                    break
                at = last_at = self._arrival(direction, len(data), last_at)
                queue.append((at, data))
                queued += len(data)
                if queued >= self.buffer_bytes:
                    room.clear()
                ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            done = True
            ready.set()
            try:
                await task
            except (ConnectionError, OSError):
                pass

    def _arrival(self, direction: str, nbytes: int, last_at: float) -> float:
        """When ``nbytes`` read now reach the other side: after the link is free and they are
        sent at the rate (plus a retransmission timeout if lost), the delay (with jitter), and
        never before the previous chunk (in order, as on one TCP connection)."""
        tx = nbytes * 8 / self.rate_bps if self.rate_bps else 0.0
        depart = max(time.monotonic(), self._link_free[direction]) + tx
        if self._lost(nbytes):  # a retransmission timeout: this chunk waits, the link idles
            depart += self.rto_s
        self._link_free[direction] = depart
        delay = self.delay_s
        if self.jitter_s:
            delay = max(0.0, delay + self._rng.uniform(-self.jitter_s, self.jitter_s))
        return max(depart + delay, last_at)

    def _lost(self, nbytes: int) -> int:
        """How many of the packets carrying ``nbytes`` are lost (each with probability loss)."""
        if not self.loss:
            return 0
        packets = -(-nbytes // MSS)
        # P(no loss) = (1 - loss)^packets; the common case costs one draw
        if self._rng.random() < (1.0 - self.loss) ** packets:
            return 0
        n = max(1, sum(self._rng.random() < self.loss for _ in range(packets)))
        self.lost_packets += n
        self.stalls += 1
        return n

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        host, _, port = self.upstream.rpartition(":")
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pump(cr, uw, "up"), self._pump(ur, cw, "down"))
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            for w in (cw, uw):
                w.close()
            self._tasks.discard(task)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port))
        self.address = f"{host}:{self._server.sockets[0].getsockname()[1]}"

    def start(self) -> str:
        """Serve in a background thread; returns the listening address."""
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("proxy did not start")
        return self.address

    def stop(self) -> None:
        """Close every connection and the listener; joins the proxy thread."""
        loop = self._loop
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                self._thread.join(timeout=5)
                self._loop = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def netns_available() -> str:
    """'' when namespaces can be used here, else the reason they cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for ip netns"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed"
    return ""


class NetnsLink:
    """Two namespaces ``<prefix>a`` / ``<prefix>b`` joined by a veth pair, tbf on both ends.

    Addresses: ``10.<x>.<y>.1`` in a, ``.2`` in b (a /30 chosen from the pid). ``exec_a`` /
    ``exec_b`` give a command prefix that runs in the namespace. Removed on ``close()``.
    """

    def __init__(self, rate_mbit: float = 100.0, burst_kb: int = 64, latency_ms: int = 50) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns_a, self.ns_b = f"lcga{tag}", f"lcgb{tag}"
        self.dev_a, self.dev_b = f"lcva{tag}", f"lcvb{tag}"
        x = os.getpid() % 250
        self.ip_a, self.ip_b = f"10.231.{x}.1", f"10.231.{x}.2"
        self.rate_mbit, self.burst_kb, self.latency_ms = rate_mbit, burst_kb, latency_ms

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)

    def open(self) -> NetnsLink:
        try:
            self._ip("netns", "add", self.ns_a)
            self._ip("netns", "add", self.ns_b)
            self._ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b)
            for ns, dev, ip in (
                (self.ns_a, self.dev_a, self.ip_a),
                (self.ns_b, self.dev_b, self.ip_b),
            ):
                self._ip("link", "set", dev, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                self._ip("-n", ns, "link", "set", dev, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                if self.rate_mbit:
                    subprocess.run(
                        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", f"{self.rate_mbit}mbit", "burst", f"{self.burst_kb}kb",
                         "latency", f"{self.latency_ms}ms"],
                        check=True, capture_output=True, timeout=20,
                    )  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        """Delete both namespaces (and the veth pair, wherever a failed setup left it)."""
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.dev_a], capture_output=True, timeout=20)

    def __enter__(self) -> NetnsLink:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loco.gossip.netem")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy", help="delay/rate TCP proxy")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--upstream", required=True)
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay (RTT = 2x)")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="0 = unlimited")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="one-way delay +- this")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss rate, e.g. 0.01")
    args = ap.parse_args(argv)
    proxy = DelayProxy(
        args.upstream,
        listen=args.listen,
        delay_s=args.delay_ms / 1000,
        rate_bps=args.rate_mbit * 1e6,
        jitter_s=args.jitter_ms / 1000,
        loss=args.loss,
    )
    print(json.dumps({"address": proxy.start()}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
