"""The README's "Sites on several machines" recipe, run as a user types it, on one machine.

The command lines come from README.md itself (the first ``bash`` block under that heading).
Each line runs in bash as written, with only these changes: the hosts (``NAME.example.org``
and the ``0.0.0.0`` of a site's own ``site.listen``) become 127.0.0.1 with a free port per
site, and the workers get cheap settings appended (tiny model, few steps, short ``outer.H``).
Certificates first, then every worker in the background, ``loco.status`` once eu is in its
rounds, then every worker must exit 0 having paired with a partner.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loco.config import ConfigError, compose
from loco.metrics import read_metrics
from loco.worker import quote_peers
from tests.gossip.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### Sites on several machines"
CHEAP = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_every=20", "train.eval_batches=2", "train.log_every=10",
    "train.warmup_steps=2", "train.threads=1", "train.progress=false",
    "train.tensorboard=false", "gossip.heartbeat_s=0.5",
]  # fmt: skip


def recipe() -> list[str]:
    """The command lines of the first bash block under HEADING in README.md (comment lines
    and blank lines left out; a line's own trailing comment kept, as a user would paste it)."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(HEADING) :], re.S)
    assert block is not None, f"no bash block under {HEADING!r}"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def strip_comment(line: str) -> str:
    """``line`` without its trailing shell comment (a ``#`` after a blank, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def localize(line: str, ports: dict[str, int]) -> str:
    """The hosts of ``line`` on this machine: ``NAME.example.org:PORT`` -> 127.0.0.1 and
    site NAME's port; ``0.0.0.0:PORT`` on the line of ``+site=NAME`` -> the same."""
    line = re.sub(r"\b([a-z]+)\.example\.org:\d+", lambda m: f"127.0.0.1:{ports[m[1]]}", line)
    site = re.search(r"\+site=([a-z]+)", line)
    if site is not None:
        line = re.sub(r"\b0\.0\.0\.0:\d+", f"127.0.0.1:{ports[site[1]]}", line)
    return line


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LOCO_DEBUG"}
    # `python` is this interpreter, as in the README's activated environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"PYTHONUNBUFFERED": "1"}


def _bash(cmd: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=_env(), text=True, **kw)


def _outer(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_metrics(path, "outer") if path.exists() else []


def run_recipe(tmp_path: Path, steps: int, h: int, timeout: float) -> None:
    lines = recipe()
    workers = [ln for ln in lines if "loco.worker" in ln]
    sites = [re.search(r"\+site=([a-z]+)", ln)[1] for ln in workers]
    assert sites == ["eu", "us", "asia"], lines
    ports = {s: free_port() for s in sites}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for line in lines:
            cmd = localize(strip_comment(line), ports)
            if "loco.worker" in line:
                site = re.search(r"\+site=([a-z]+)", line)[1]
                extra = [*CHEAP, f"train.steps={steps}", f"outer.H={h}",
                         f"hydra.run.dir={tmp_path / 'run' / site}"]  # fmt: skip
                log = (tmp_path / f"{site}.log").open("w")
                procs[site] = _bash(f"{cmd} {' '.join(extra)}", tmp_path, stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            elif "loco.status" in line:
                _check_status(cmd, tmp_path, procs, timeout)
            else:
                done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=_env(), text=True,
                                      capture_output=True, timeout=60)  # fmt: skip
                assert done.returncode == 0, (cmd, done.stderr)
        codes = {s: p.wait(timeout=timeout) for s, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == dict.fromkeys(sites, 0), {s: _tail(tmp_path, s) for s in sites}
    for s in sites:
        recs = _outer(tmp_path / "run" / s)
        # the default outer form: steps // h pairwise rounds, then one average over every site
        rounds = [r for r in recs if not r.get("final")]
        assert len(rounds) == steps // h, (s, recs)
        assert any(r["n"] >= 2 and r["partner"] for r in rounds), (s, recs)
        assert [r["n"] for r in recs if r.get("final")] == [len(sites)], (s, recs)


def _check_status(cmd: str, cwd: Path, procs: dict, timeout: float) -> None:
    """The status line, once eu has merged a round (it is up and has a partner to show)."""
    end = time.monotonic() + timeout
    while not _outer(cwd / "run" / "eu"):
        assert time.monotonic() < end and procs["eu"].poll() is None, _tail(cwd, "eu")
        time.sleep(0.2)
    out = _bash(cmd, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = out.communicate(timeout=60)
    assert out.returncode == 0, (cmd, stderr)
    for site in ("eu", "us", "asia"):
        assert re.search(rf"\b{site}\b.*\byes\b", stdout), stdout


def _tail(tmp_path: Path, site: str) -> str:
    log = tmp_path / f"{site}.log"
    return log.read_text()[-3000:] if log.exists() else ""


def test_readme_recipe(tmp_path):
    """Three sites, 40 steps, a round every 10 (about 35 s on 2 busy cores)."""
    run_recipe(tmp_path, steps=40, h=10, timeout=240)


# ---------------------------------------------------------------- pieces


def test_recipe_is_in_the_readme():
    lines = recipe()
    assert lines[0].startswith("python -m loco.certs --out certs --sites eu us asia")
    assert sum("python -m loco.worker +site=" in ln for ln in lines) == 3
    assert any(ln.startswith("python -m loco.status ") for ln in lines)


def test_localize_and_strip_comment():
    ports = {"eu": 1001, "us": 1002, "asia": 1003}
    line = ("python -m loco.worker +site=us site.listen=0.0.0.0:50051 "
            "'site.peers=[eu=eu.example.org:50051,asia=asia.example.org:50051]' # on 'us' #1")  # fmt: skip
    assert localize(strip_comment(line), ports) == (
        "python -m loco.worker +site=us site.listen=127.0.0.1:1002 "
        "'site.peers=[eu=127.0.0.1:1001,asia=127.0.0.1:1003]'"
    )
    assert strip_comment("echo 'a # b' x#y # c") == "echo 'a # b' x#y"


@pytest.mark.parametrize(
    "arg, peers",
    [("site.peers=[us=127.0.0.1:31500,asia=127.0.0.1:31600]",
      ["us=127.0.0.1:31500", "asia=127.0.0.1:31600"]),
     ("site.peers=[us=us.example.org:50051]", ["us=us.example.org:50051"]),
     ("site.peers=[us, asia=[::1]:5]", ["us", "asia=[::1]:5"]),
     ("site.peers=['us=127.0.0.1:31500']", ["us=127.0.0.1:31500"]),
     ('site.peers=["us=h:1","asia"]', ["us=h:1", "asia"]),
     ("site.peers=[us,asia]", ["us", "asia"]),
     ("site.peers=[]", [])],
)  # fmt: skip
def test_site_peers_forms_compose(arg, peers):
    """The natural ``NAME=HOST:PORT`` list and Hydra's quoted one give the same peers."""
    assert compose(["+site=eu", *quote_peers([arg])]).site.peers == peers


def test_hydra_alone_refuses_the_natural_form():
    """Why ``quote_peers`` exists: without it Hydra stops at ``[us=``."""
    with pytest.raises(ConfigError, match=r"no viable alternative"):
        compose(["+site=eu", "site.peers=[us=127.0.0.1:31500]"])


def test_quote_peers_leaves_other_arguments_alone():
    args = ["+site=eu", "site.listen=0.0.0.0:1", "site.peers=[US=h:1]", "x=[a=b]",
            "site.peers=[us='h:1']", "site.peers=[us=a b]"]  # fmt: skip
    assert quote_peers(args) == args
    assert quote_peers(["+site.peers=[us=h:1]"]) == ["+site.peers=['us=h:1']"]


def test_natural_peers_form_reaches_the_worker(tmp_path):
    """``loco.worker`` itself takes the unquoted form (Hydra alone stops at ``[us=``)."""
    out = subprocess.run(
        [sys.executable, "-m", "loco.worker", "+site=eu",
         "site.peers=[us=127.0.0.1:31500,asia=127.0.0.1:31600]", "--cfg", "job"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "- us=127.0.0.1:31500" in out.stdout and "- asia=127.0.0.1:31600" in out.stdout
