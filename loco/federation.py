"""A whole federation on this machine: every site of ``federation.sites`` as a real
``loco.worker`` process (its ranks are its own children) talking real gRPC on loopback, each in
``<run dir>/<site>/``. ``python -m loco.local`` is its command line.

:func:`run_federation` starts the sites, waits for them, then writes ``federation.json``,
``summary.txt`` (one line per site: final validation loss, distance of its final parameters from
the sites' mean, rounds, bytes sent beside what DDP would have sent for the same steps, compute
utilization) and ``report.md``. Ctrl-C (or SIGTERM) stops every site cleanly (SIGINT to each
site's process group, then SIGKILL after a grace). :class:`Federation` holds the site processes
(start, kill, restart, wait, stop).

Every site gets free loopback ports, shard = its index in ``federation.sites``, the other
sites as peers, and ``federation.nproc[i]`` ranks when that list is given (else ``site.nproc``);
a site without ``conf/site/NAME.yaml`` is built from ``eu.yaml`` with its name changed. mTLS
certificates are made into ``<run dir>/certs`` (the run CA in ``certs/ca``) unless
``gossip.insecure=true``; each site gets only its own bundle,
``gossip.cert_dir=<run dir>/certs/<site>`` (with ``gossip.cert_dir=ROOT``, the output of
``python -m loco.certs --out ROOT``: ``ROOT/<site>``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from loco.config import CONF_DIR, ConfigError, compose
from loco.errors import describe as describe_exit
from loco.summary import MODEL_FILE, read_summary

GRACE_S = 15.0  # after Ctrl-C, how long sites get to stop before SIGKILL
STATUS_EVERY_S = 10.0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ports_free(base: int, n: int) -> bool:
    for p in range(base, base + n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def free_base_ports(count: int, span: int) -> list[int]:
    """``count`` base ports, each followed by ``span - 1`` free ports (rank r: base + r)."""
    out: list[int] = []
    while len(out) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span < 65536 and _ports_free(base, span):
            if all(abs(base - b) >= span for b in out):
                out.append(base)
    return out


def _has(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def _value(overrides: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` override (quotes stripped), or None."""
    vals = [o.split("=", 1)[1] for o in overrides if _has([o], key) and "=" in o]
    return vals[-1].strip("'\"") if vals else None


def site_args(name: str, index: int, sites: list[str], ports: dict[str, int],
              overrides: list[str], cert_dir: Path | None, threads: int,
              nproc: int | None = None) -> list[str]:  # fmt: skip
    """The ``loco.worker`` overrides of site ``name`` of the federation; ``cert_dir``, when
    given, is this site's own certificate bundle and replaces any ``gossip.cert_dir``."""
    known = (CONF_DIR / "site" / f"{name}.yaml").exists()
    args = [f"+site={name}" if known else "+site=eu"]
    if not known:
        args.append(f"site.name={name}")
    peers = ",".join(f"'{s}=127.0.0.1:{ports[s]}'" for s in sites if s != name)
    args += [f"site.listen=127.0.0.1:{ports[name]}", f"site.shard={index}", f"site.peers=[{peers}]"]
    user = [o for o in overrides if not o.lstrip("+~").startswith(("hydra", "site="))]
    if nproc is not None:  # federation.nproc: this site's own rank count
        user = [o for o in user if o.lstrip("+~").split("=", 1)[0] != "site.nproc"]
        user.append(f"site.nproc={nproc}")
    if not _has(user, "data.num_shards"):
        args.append(f"data.num_shards={max(3, len(sites))}")
    if not _has(user, "train.threads"):
        args.append(f"train.threads={threads}")
    if not _has(user, "train.progress"):
        args.append("train.progress=false")
    if cert_dir is not None:
        user = [o for o in user if not _has([o], "gossip.cert_dir")]
        args.append(f"gossip.cert_dir={cert_dir}")
    return args + user


class Federation:
    """The site processes of one local federation."""

    def __init__(self, run_dir: Path, sites: list[str], overrides: list[str], *, nproc: int,
                 insecure: bool, method: str, nprocs: list[int] | None = None) -> None:  # fmt: skip
        self.run_dir, self.sites, self.overrides = run_dir, sites, overrides
        self.nproc, self.insecure, self.method = nproc, insecure, method
        self.nprocs = dict(zip(sites, nprocs, strict=True)) if nprocs else {}
        if self.nprocs:
            self.nproc = max(self.nprocs.values())
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Any] = {}
        self.cmds: dict[str, list[str]] = {}  # each site's command line (restart)
        self.env: dict[str, str] = {}
        self.started = 0.0

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cert_dirs = self._cert_dirs()
        bases = free_base_ports(len(self.sites), self.nproc)
        ports = dict(zip(self.sites, bases, strict=True))
        ranks = sum(self.nprocs.values()) if self.nprocs else len(self.sites) * self.nproc
        threads = max(1, (os.cpu_count() or 1) // ranks)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        for i, name in enumerate(self.sites):
            args = site_args(name, i, self.sites, ports, self.overrides, cert_dirs.get(name),
                             threads, self.nprocs.get(name))  # fmt: skip
            self.cmds[name] = [sys.executable, "-m", "loco.worker", *args]
            self._launch(name, self.run_dir / name, [], "wb")

    def _cert_dirs(self) -> dict[str, Path]:
        """Each site's own certificate bundle (``gossip.cert_dir``): ``ROOT/<site>`` of a
        ``gossip.cert_dir=ROOT`` override that holds bundles (else that override goes to every
        site as it is), or made into ``<run dir>/certs`` with the run CA in its ``ca/``
        (signing only the sites missing there when an earlier start left a CA). Empty under
        ``gossip.insecure=true`` or ``outer=local``. Raises ConfigError (one line)."""
        from loco.certs import CertsError, ca_dir, site_bundle, write_run_certs

        given = _value(self.overrides, "gossip.cert_dir")
        if given is not None:
            found = {s: site_bundle(given, s) for s in self.sites}
            return {s: d for s, d in found.items() if d.is_dir()}
        if self.insecure or self.method == "local":
            return {}
        root = self.run_dir / "certs"
        ca = ca_dir(root) if (ca_dir(root) / "ca.key").exists() else None
        missing = [s for s in self.sites if ca is None or not site_bundle(root, s).exists()]
        try:
            if missing:
                write_run_certs(root, missing, ca=ca)
        except CertsError as e:
            raise ConfigError(f"certificates in {root}: {e}") from None
        return {s: site_bundle(root, s) for s in self.sites}

    def _launch(self, name: str, d: Path, extra: list[str], mode: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        cmd = [*self.cmds[name], *extra, f"hydra.run.dir={d}"]
        (d / "command.txt").write_text(" ".join(cmd) + "\n")
        if name in self.logs:
            self.logs[name].close()
        self.logs[name] = open(d / "worker.log", mode)  # noqa: SIM115 (closed by close())
        self.procs[name] = subprocess.Popen(
            cmd, stdout=self.logs[name], stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # its own process group: we signal its ranks with it
        )  # fmt: skip

    def kill(self, name: str) -> int:
        """``kill -9`` site ``name``: SIGKILL to its process group (the worker and its ranks),
        as a crash would; returns its exit code. The other sites go on."""
        p = self.procs[name]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return p.wait()

    def restart(
        self, name: str, extra: list[str] | None = None, run_dir: Path | None = None
    ) -> None:
        """Start site ``name`` again (after it died or was killed) with its command line, its
        address and certificate, plus the ``extra`` overrides (e.g. ``resume=latest``): in its
        own run dir (its log is appended to), or in ``run_dir`` (a replacement: fresh state)."""
        if self.procs[name].poll() is None:
            raise ValueError(f"site {name} is still running; kill it first")
        d = run_dir if run_dir is not None else self.run_dir / name
        self._launch(name, d, list(extra or []), "wb" if run_dir is not None else "ab")

    def poll(self) -> dict[str, int | None]:
        return {n: p.poll() for n, p in self.procs.items()}

    def wait(
        self, status_every: float = STATUS_EVERY_S, timeout: float | None = None
    ) -> dict[str, int]:
        last = time.monotonic()
        while any(c is None for c in self.poll().values()):
            time.sleep(0.2)
            if timeout is not None and time.monotonic() - self.started > timeout:
                print(f"loco.local: timeout after {timeout:.0f} s; stopping", file=sys.stderr)
                self.stop()
                break
            if status_every and time.monotonic() - last >= status_every:
                last = time.monotonic()
                print(f"loco.local: {self.status()}", file=sys.stderr, flush=True)
        return {n: int(c if c is not None else -9) for n, c in self.poll().items()}

    def status(self) -> str:
        parts = []
        for name, code in self.poll().items():
            rec = _last_record(self.run_dir / name / "metrics.jsonl", "train")
            what = f"step {rec['step']} loss {rec['loss']:.3f}" if rec else "starting"
            if code is not None:
                what += f" (exit {code})"
            parts.append(f"{name} {what}")
        return f"{time.monotonic() - self.started:.0f}s  " + " | ".join(parts)

    def stop(self, grace: float = GRACE_S) -> None:
        """SIGINT to every site's process group, SIGKILL to what is left after ``grace``."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the site's ranks too, if any is left
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        self.close()

    def close(self) -> None:
        for f in self.logs.values():
            f.close()


def _last_record(path: Path, kind: str) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == kind:
            return rec
    return None


def final_params(run_dir: Path) -> Any:
    """The final parameters of the site run in ``run_dir`` as one fp64 vector (the tensors of
    its ``model.safetensors`` in name order), or None when it wrote none."""
    import torch
    from safetensors.torch import load_file

    path = run_dir / MODEL_FILE
    if not path.is_file():
        return None
    state = load_file(str(path))
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


def final_distances(run_dir: Path, sites: list[str]) -> dict[str, float]:
    """RMS distance of each site's final parameters from the mean over the sites."""
    import torch

    vecs = {s: v for s in sites if (v := final_params(run_dir / s)) is not None}
    if len(vecs) < 2:
        return {}
    mean = torch.stack(list(vecs.values())).mean(0)
    return {s: float((v - mean).pow(2).mean().sqrt()) for s, v in vecs.items()}


def summarize(run_dir: Path, sites: list[str], codes: dict[str, int]) -> list[dict[str, Any]]:
    dist_final = final_distances(run_dir, sites)
    rows = []
    for s in sites:
        row: dict[str, Any] = {"site": s, "exit": codes.get(s)}
        try:
            row.update(read_summary(run_dir / s))
        except (OSError, ValueError):  # stopped or failed: what its metrics say so far
            tr = _last_record(run_dir / s / "metrics.jsonl", "train")
            ev = _last_record(run_dir / s / "metrics.jsonl", "eval")
            row["steps"] = tr["step"] if tr else None
            row["val_loss"] = ev["loss"] if ev else None
        row["final_distance"] = dist_final.get(s)
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


_HEAD = ["site", "exit", "steps", "val loss", "distance", "rounds", "dropped", "bytes sent",
         "DDP bytes", "DDP / sent", "utilization"]  # fmt: skip


def _cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One list of formatted cells per site, in the order of ``_HEAD``."""
    body = []
    for r in rows:
        sent, ddp = r.get("bytes_sent"), r.get("ddp_bytes")
        ratio = ddp / sent if sent and ddp else None
        body.append([
            r["site"], describe_exit(r.get("exit")), _fmt(r.get("steps"), "d"),
            _fmt(r.get("val_loss"), ".4f"), _fmt(r.get("final_distance"), ".2e"),
            _fmt(r.get("rounds"), "d"), _fmt(r.get("rounds_dropped"), "d"), _bytes(sent),
            _bytes(ddp), _fmt(ratio, ".0f") + ("x" if ratio else ""),
            _fmt(r.get("compute_utilization"), ".0%"),
        ])  # fmt: skip
    return body


def table(rows: list[dict[str, Any]]) -> str:
    """The per-site summary table (plain text, aligned); a non-zero exit names its kind
    (``2 config``, ``3 run-time``, ``1 crash``, ``-9 crash (SIGKILL)``: loco.errors)."""
    body = _cells(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(_HEAD)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(_HEAD, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], file: TextIO | None = None) -> None:
    """Print the summary table on ``file`` (stdout): a ``rich`` table on a terminal, else
    :func:`table`'s plain text (the same cells)."""
    file = file if file is not None else sys.stdout
    if not file.isatty():
        print(table(rows), file=file, flush=True)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for i, head in enumerate(_HEAD):
        grid.add_column(head, justify="left" if i < 2 else "right")  # figures right-aligned
    for cells in _cells(rows):
        grid.add_row(*map(Text, cells))  # Text: a cell is never read as rich markup
    console = Console(file=file, highlight=False)
    # never shorten a figure to fit a narrow terminal: let the terminal wrap the line instead
    natural = console.measure(grid, options=console.options.update_width(10_000)).maximum
    console.width = max(console.width, natural)
    console.print(grid)
    file.flush()


def run_federation(overrides: list[str], run_dir: Path, timeout: float | None = None) -> dict:
    """Start the federation of ``overrides`` in ``run_dir``, wait, write and return the summary.

    Raises ConfigError (one line) before starting anything when the configuration is bad.
    """
    overrides = [o for o in overrides if not o.startswith("-")]
    fed_ov = [o for o in overrides if not o.lstrip("+~").startswith("site")]
    cfg = compose(fed_ov, need_site=False)
    sites = list(cfg.federation.sites)
    if len(set(sites)) != len(sites) or not sites:
        raise ConfigError(f"federation.sites={sites} must be distinct site names")
    nproc = max(compose(site_args(n, 0, sites, dict.fromkeys(sites, 1), overrides, None, 1)).site.nproc
                for n in sites)  # fmt: skip
    fed = Federation(run_dir, sites, overrides, nproc=nproc, insecure=cfg.gossip.insecure,
                     nprocs=list(cfg.federation.nproc) or None,
                     method=cfg.outer.method)  # fmt: skip
    o = cfg.outer
    stepped = o.method == "noloco" and o.consensus == "stepped"  # no delta travels
    codec = "none sent (stepped)" if stepped else cfg.compression.codec
    print(f"loco.local: {len(sites)} sites ({', '.join(sites)}), outer={o.method} "
          f"H={o.H}, codec={codec}; run dir {run_dir}", file=sys.stderr, flush=True)  # fmt: skip
    codes, interrupted = _run_sites(fed, timeout)
    rows = summarize(run_dir, sites, codes)
    wall = time.monotonic() - fed.started
    out = {"sites": rows, "wall_s": wall, "interrupted": interrupted,
           "outer": cfg.outer.method, "H": cfg.outer.H, "codec": cfg.compression.codec}  # fmt: skip
    _write_results(run_dir, out)
    return out


def _run_sites(fed: Federation, timeout: float | None) -> tuple[dict[str, int], bool]:
    """Start the sites and wait for them; Ctrl-C or SIGTERM stops them all. Returns each
    site's exit code (-9: killed) and whether it was interrupted."""
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        fed.start()
        return fed.wait(timeout=timeout), False
    except KeyboardInterrupt:
        print("\nloco.local: stopping every site ...", file=sys.stderr, flush=True)
        fed.stop()
        return {n: int(c) if c is not None else -9 for n, c in fed.poll().items()}, True
    finally:
        signal.signal(signal.SIGTERM, old)
        fed.close()


def _write_results(run_dir: Path, out: dict[str, Any]) -> None:
    """``federation.json``, ``summary.txt`` (the table, also printed) and ``report.md``."""
    rows = out["sites"]
    (run_dir / "federation.json").write_text(json.dumps(out, indent=2) + "\n")
    text = table(rows)
    (run_dir / "summary.txt").write_text(text + "\n")
    print_table(rows)
    from loco.report import try_write_report

    sites = [r["site"] for r in rows]
    try_write_report(run_dir, title=f"loco.local federation: {', '.join(sites)}")
    print(f"loco.local: {out['wall_s']:.0f} s; per-site logs in {run_dir}/<site>/worker.log; "
          f"report {run_dir}/report.md", flush=True)  # fmt: skip
