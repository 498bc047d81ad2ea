"""A standalone site serving a synthetic payload, for drills, benchmarks and manual checks.

    python -m loco.gossip.peer --site us --nproc 2 --flat-size 1000000 --rounds 0 --insecure

Publishes, for each listed round, stream "delta" = ``synthetic(flat_size, seed + round)`` split
over its ranks, prints one JSON line ``{"site", "addresses"}`` and serves until killed or until
stdin closes. Fault flags (``--exit-after-chunks``, ``--delay``, ``--corrupt-chunk``) exercise
the client's error paths: with any of them the ranks are ``loco.testing`` ``FaultyServer``s.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import numpy as np

from .server import GossipServer
from .tls import TlsConfig


def synthetic(flat_size: int, seed: int) -> np.ndarray:
    """The fp32 payload a peer publishes (reproducible from the seed)."""
    return np.random.default_rng(seed).standard_normal(flat_size, dtype=np.float32)


def _server_class(args: argparse.Namespace) -> Callable[..., GossipServer]:
    """``GossipServer``, or with a fault flag a ``FaultyServer`` bound to one shared fault."""
    if args.delay == 0.0 and args.exit_after_chunks == -1 and args.corrupt_chunk == -1:
        return GossipServer
    from loco.testing.gossip_faults import FaultyServer, ServerFault

    fault = ServerFault(
        delay_s=args.delay,
        exit_after_chunks=args.exit_after_chunks,
        corrupt_chunk=args.corrupt_chunk,
    )
    return functools.partial(FaultyServer, fault=fault)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loco.gossip.peer")
    ap.add_argument("--site", required=True)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--flat-size", type=int, required=True)
    ap.add_argument("--rounds", type=int, nargs="*", default=[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-id", default="run-test")
    ap.add_argument("--layout-hash", default="layout-abc")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="rank r binds port + r (0: any)")
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument(
        "--insecure-public",
        action="store_true",
        help="with --insecure: allow plaintext on a non-loopback address",
    )
    ap.add_argument("--certs", help="this site's bundle DIR/<site> from python -m loco.certs")
    ap.add_argument("--members", nargs="*")
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20)
    ap.add_argument("--exit-after-chunks", type=int, default=-1)
    ap.add_argument("--corrupt-chunk", type=int, default=-1)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    tls = None if args.insecure else TlsConfig.for_site(args.certs, args.site)
    server = _server_class(args)
    servers = []
    for r in range(args.nproc):
        port = args.port + r if args.port else 0
        s = server(
            site=args.site, rank=r, nproc=args.nproc, flat_size=args.flat_size,
            run_id=args.run_id, layout_hash=args.layout_hash, listen=f"{args.host}:{port}",
            tls=tls, insecure=args.insecure, members=args.members, chunk_bytes=args.chunk_bytes,
            allow_public_plaintext=args.insecure_public,
        )  # fmt: skip
        s.start()
        servers.append(s)
    addrs = [s.address for s in servers]
    for rnd in args.rounds:
        full = synthetic(args.flat_size, args.seed + rnd)
        for s in servers:
            s.set_rank_addresses(addrs)
            s.publish(rnd, "delta", full[s.lo : s.hi])
    print(json.dumps({"site": args.site, "addresses": addrs}), flush=True)
    sys.stdin.read()  # serve until stdin closes (or the process is killed)
    for s in servers:
        s.stop(grace=0)


if __name__ == "__main__":
    main()
