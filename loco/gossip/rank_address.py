"""The host a rank's gossip server binds and advertises, when a site's ranks span machines.

A site's address (``site.listen``) is its rank 0's. Rank r serves on port ``port + r`` of its own
host: ``site.advertise`` when set (one value per machine, given to that machine's ranks), else
the address of this machine's interface that routes to the site's host (which every rank of the
site reaches anyway: it is the rendezvous of the federation's peers), which is the site's host
itself on rank 0's machine. The ranks then exchange what they bound (``all_gather``) and every
server's Hello reports all of them, so a partner pulls each range from the machine that owns it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def _strip(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def route_source(host: str) -> str | None:
    """The local address this machine sends from to reach ``host`` (no packet is sent: a UDP
    socket's ``connect`` only asks the routing table); None if it cannot be resolved or routed."""
    host = _strip(host)
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(addr)
                return str(s.getsockname()[0])
        except OSError:
            continue
    return None


def _is_local(host: str) -> bool:
    """Whether ``host`` (a name or an address) is one of this machine's addresses."""
    host = _strip(host)
    try:
        addrs = {i[4][0] for i in socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)}
    except OSError:
        return False
    return any(route_source(a) == a or ipaddress.ip_address(a).is_loopback for a in addrs)


def rank_host(listen: str, advertise: str = "") -> str:
    """The host this rank binds and advertises: ``advertise`` (``site.advertise``, one value per
    machine) when set; the site's host when it is this machine's (or a wildcard); else the
    address of this machine's interface that routes to the site's host."""
    if advertise:
        return advertise
    host = listen.rpartition(":")[0]
    if _strip(host) in WILDCARD_HOSTS or _is_local(host):
        return host
    src = route_source(host)
    if src is None:
        return host  # the bind fails with the address in its message
    return f"[{src}]" if ":" in src else src


def rank_listen(listen: str, rank: int, host: str | None = None, first: int = 0) -> str:
    """``host:port`` of rank ``rank``'s server: the site's port for rank ``first`` (the lowest
    rank on the site's machine), port + rank for the others (port 0 stays 0: a free port)."""
    h, _, p = listen.rpartition(":")
    port = int(p)
    return f"{h if host is None else host}:{port + (0 if rank == first else rank) if port else 0}"


def rank_binds(listen: str, rank: int, advertise: str, gather: Callable[[Any], list]) -> str:
    """This rank's ``host:port`` in a site whose ranks may span machines. ``gather``: the
    site's all-gather of a small object (every rank calls this together). The lowest rank
    whose machine holds the site's host serves the site's address itself, so a rendezvous that
    puts rank 0 on another machine still leaves ``site.listen`` answered.

    Raises ValueError when no rank of the site is on the machine of ``site.listen``'s host."""
    host = rank_host(listen, advertise)
    site_host = listen.rpartition(":")[0]
    here = gather(host == site_host or _strip(site_host) in WILDCARD_HOSTS)
    if not any(here):
        raise ValueError(
            f"no rank of this site runs on the machine of site.listen={listen}: set site.listen to "
            "the address of the machine of one of its ranks (its first rank serves it)"
        )
    return rank_listen(listen, rank, host, here.index(True))


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that holds ``address`` (IPv4), or None."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                got = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24])
            except OSError:
                continue  # no IPv4 address on it
            if got == address:
                return name
    return None


def collective_interface(master: str) -> str | None:
    """The interface the site's collectives should use with ``master`` (the rendezvous host of
    a site on several machines): the one holding it, or routing to it; None for a loopback or
    unresolvable host (then the backend's default choice stands)."""
    src = route_source(master)
    if src is None or ipaddress.ip_address(src).is_loopback:
        return None
    return interface_of(src)
