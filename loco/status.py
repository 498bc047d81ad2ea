"""``python -m loco.status [SITE=]HOST:PORT``: the federation as one member sees it.

    python -m loco.status 127.0.0.1:50051 --cert-dir certs/eu          # eu asks itself
    python -m loco.status us=us.example.org:50051 --cert-dir certs/eu  # eu's bundle asks us
    python -m loco.status 127.0.0.1:29400 --insecure --json            # a plaintext federation

Calls the member's read-only Status RPC (``loco.gossip.status``) and prints one table: the
configured sites, whether each is live by the member's heartbeats, the latest round each is
known at, the last pairing, bytes served to / pulled from each, strikes and bans; ``--json``
prints the same as one JSON object. HOST:PORT is any rank's gossip address (rank 0's, the
site's ``site.listen``, has the heartbeats). The caller shows a certificate of the run CA that
names a member, so any site's bundle works (``--cert-dir``, as ``gossip.cert_dir``); SITE= is
the member's site name, which its certificate must carry (default: the bundle's own site).

Exit: 0 printed; 2 a mistake in the command (address, bundle, an identity the member refuses),
one line ``loco.status: error: ...``; 3 the member could not be reached in ``--timeout`` or
gave an unusable answer, one line too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from loco.gossip.status import FederationStatus, SiteView
    from loco.gossip.tls import TlsConfig

# gRPC's own log lines (a failed TLS handshake) would add lines to the one this CLI prints; the
# level is read when grpc loads, so loco.gossip is imported inside the functions below
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
_ADDRESS = re.compile(r"(?:([a-z][a-z0-9_-]{0,31})=)?(\[[0-9a-fA-F:.]+\]|[^\s:=\[\]]+):(\d{1,5})")
MAX_PEM = 64 << 10  # bytes of a certificate or key file of a bundle


class StatusError(Exception):
    """Why no status was printed: one line and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_address(text: str) -> tuple[str, str]:
    """``[SITE=]HOST:PORT`` -> ``(site or '', 'HOST:PORT')``; StatusError (2) otherwise."""
    m = _ADDRESS.fullmatch(text.strip())
    if m is None or not 0 < int(m.group(3)) < 65536:
        raise StatusError(
            f"address {text!r} is not [SITE=]HOST:PORT (e.g. 127.0.0.1:29400 or "
            "us=us.example.org:50051, port 1-65535)",
            EXIT_USAGE,
        )
    return m.group(1) or "", f"{m.group(2)}:{m.group(3)}"


def load_bundle(cert_dir: str) -> tuple[TlsConfig, str]:
    """A site's bundle ``DIR/<site>`` (``ca.pem``, ``<site>.pem``, ``<site>.key``) and that
    site's name; StatusError (2) when it is not one."""
    from loco.gossip.tls import TlsConfig

    d = Path(cert_dir)
    if not d.is_dir():
        raise StatusError(f"--cert-dir {cert_dir}: no such directory", EXIT_USAGE)
    sites = sorted(p.stem for p in d.glob("*.pem") if p.name != "ca.pem")
    if len(sites) != 1 or not (d / "ca.pem").is_file() or not (d / f"{sites[0]}.key").is_file():
        raise StatusError(
            f"--cert-dir {cert_dir} is not a site's bundle (ca.pem, <site>.pem, <site>.key of "
            "python -m loco.certs)",
            EXIT_USAGE,
        )
    files = [d / "ca.pem", d / f"{sites[0]}.pem", d / f"{sites[0]}.key"]
    try:
        if any(f.stat().st_size > MAX_PEM for f in files):
            raise StatusError(f"--cert-dir {cert_dir}: a file over {MAX_PEM} bytes", EXIT_USAGE)
        return TlsConfig.from_files(*files), sites[0]
    except OSError as e:
        raise StatusError(f"--cert-dir {cert_dir}: {e.strerror}: {e.filename}", EXIT_USAGE) from e


def fetch(args: argparse.Namespace) -> FederationStatus:
    """The checked answer of the member ``args.address``; StatusError with the exit status."""
    from loco.gossip.errors import AuthError, BadPayload, GossipError, PeerUnavailable, PullTimeout
    from loco.gossip.status import read_status

    target, address = parse_address(args.address)
    tls, own = load_bundle(args.cert_dir) if args.cert_dir else (None, "")
    target = target or own
    try:
        return read_status(
            address, tls=tls, target=target, caller=own, timeout_s=args.timeout
        )  # fmt: skip
    except AuthError as e:
        raise StatusError(
            f"{address} refused the identity or is not {target!r}: {_first_line(e)} (give a "
            "bundle of this run's CA with --cert-dir, and the member's site as SITE=HOST:PORT)",
            EXIT_USAGE,
        ) from None
    except (PeerUnavailable, PullTimeout) as e:
        raise StatusError(
            f"cannot reach {address} within {args.timeout:g} s: {_first_line(e)}",
            EXIT_UNREACHABLE,
        ) from None
    except BadPayload as e:
        raise StatusError(_first_line(e), EXIT_UNREACHABLE) from None
    except GossipError as e:
        raise StatusError(
            f"{address} did not answer Status (not a loco member, or an older one): "
            f"{_first_line(e)}",
            EXIT_UNREACHABLE,
        ) from None


def _first_line(e: BaseException) -> str:
    """The cause in ``e``'s message (which may quote the member: hostile), printable and cut:
    gRPC's last connection error when it gives one."""
    from loco.gossip.status import MAX_ERROR, clean

    lines = str(e).strip().splitlines()
    text = lines[0].rsplit("last error: ", 1)[-1] if lines else type(e).__name__
    return clean(text, MAX_ERROR)


def _round(r: int) -> str:
    return str(r) if r >= 0 else "-"


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _row(s: SiteView, st: FederationStatus) -> list[str]:
    live = {True: "yes", False: "no", None: "?"}[s.live]
    if s.me:
        paired = f"{_round(st.pairing_round)}: {','.join(st.partners) or 'alone'}"
    elif s.paired_round >= 0:
        paired = f"{s.paired_round} {'ok' if s.paired_ok else 'failed'}"
    else:
        paired = "-"
    mine = st.sites[0].round
    banned = f"{s.bans}x" if s.bans else "-"
    if s.banned_until > mine:
        banned += f", until round {s.banned_until}"
    seen = f"{s.seen_ms_ago / 1000:.1f} s ago" if s.seen_ms_ago >= 0 else "never"
    return [f"{s.site} *" if s.me else s.site, live, _round(s.round), str(s.nproc or "-"),
            paired, _bytes(s.bytes_sent), _bytes(s.bytes_recv), str(s.strikes), banned,
            "-" if s.me else seen, s.last_error]  # fmt: skip


def render(st: FederationStatus, address: str) -> None:
    """The table on stdout (rich); every string is shown as text, never as markup."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    heartbeat = "heartbeats" if st.heartbeat else "no heartbeats here: live unknown (ask rank 0)"
    table = Table(
        title=Text(f"run {st.run_id}: {st.site} rank {st.rank}/{st.nproc} at {address} "
                   f"({heartbeat})"),
        caption=Text("* the answering site (its bytes: the rank's totals); paired: the last "
                     "round pulled from a site"),
        title_justify="left",
        caption_justify="left",
    )  # fmt: skip
    for col in ("site", "live", "round", "nproc", "paired", "sent", "recv", "strikes",
                "bans", "last hello", "error"):  # fmt: skip
        table.add_column(col, overflow="fold")
    for s in st.sites:
        table.add_row(*(Text(c) for c in _row(s, st)))
    console = Console()
    if not console.is_terminal:  # a pipe or a file: one line per site, never folded
        console = Console(width=1000)
    console.print(table)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(StatusError(f"{message} (see --help)", EXIT_USAGE))


def _fail(e: StatusError) -> NoReturn:
    print(f"loco.status: error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.status)


def main(argv: list[str] | None = None) -> None:
    """The CLI: print the member's view, or one line and exit 2 (command) or 3 (member)."""
    ap = _Parser(prog="python -m loco.status", description=__doc__.splitlines()[0])
    ap.add_argument("address", help="[SITE=]HOST:PORT of a member's gossip server")
    ap.add_argument("--cert-dir", help="a site's bundle of the run CA (as gossip.cert_dir)")
    ap.add_argument("--insecure", action="store_true", help="plaintext (gossip.insecure=true)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds for the call (5)")
    args = ap.parse_args(argv)
    try:
        if bool(args.cert_dir) == args.insecure:
            raise StatusError("give exactly one of --cert-dir DIR and --insecure", EXIT_USAGE)
        if not 0 < args.timeout <= 600:
            raise StatusError(f"--timeout {args.timeout:g} not in (0, 600]", EXIT_USAGE)
        st = fetch(args)
    except StatusError as e:
        _fail(e)
    if args.json:
        print(json.dumps(st.to_dict() | {"address": parse_address(args.address)[1]}))
    else:
        render(st, parse_address(args.address)[1])


if __name__ == "__main__":
    main()
