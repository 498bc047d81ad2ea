"""The console scripts of ``[project.scripts]`` behave as ``python -m <module>``: the same
output, Hydra overrides and ``conf/`` found from any working directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers import ROOT

SCRIPTS = {
    "loco-worker": "loco.worker",
    "loco-local": "loco.local",
    "loco-export": "loco.export",
    "loco-sample": "loco.sample",
    "loco-certs": "loco.certs",
}


def script(name: str) -> str:
    """The installed script ``name`` beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed next to {sys.executable}: pip install -e .")
    return found


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def both(name: str, args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, ...]:
    """The script and ``python -m`` run with ``args`` in ``cwd``."""
    return (run([script(name), *args], cwd),
            run([sys.executable, "-m", SCRIPTS[name], *args], cwd))  # fmt: skip


@pytest.mark.parametrize("name", ["loco-worker", "loco-local"])
def test_hydra_scripts_compose_the_same_config_from_anywhere(name, tmp_path):
    args = ["--cfg", "job", "model.n_layer=3", "train.lr=0.005"]
    if name == "loco-worker":
        args.append("+site=us")
    s, m = both(name, args, tmp_path)  # not the repository: conf/ is found from the package
    assert s.returncode == m.returncode == 0, s.stderr
    assert s.stdout == m.stdout and "n_layer: 3" in s.stdout and "lr: 0.005" in s.stdout
    if name == "loco-worker":
        assert "name: us" in s.stdout
    bad = run([script(name), "+site=eu", "model.n_layers=3"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("loco: error: unknown config key 'model.n_layers'")
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run directory


@pytest.mark.parametrize("name", ["loco-export", "loco-sample"])
def test_export_and_sample_scripts(name, tmp_path):
    s, m = both(name, ["--help"], tmp_path)
    assert s.returncode == m.returncode == 0 and s.stdout == m.stdout and "--tokenizer" in s.stdout
    s = run([script(name), str(tmp_path / "missing")], tmp_path)
    assert s.returncode == 2 and s.stdout == ""
    assert s.stderr == f"{SCRIPTS[name]}: error: {tmp_path / 'missing'} does not exist\n"


def test_certs_script_makes_bundles(tmp_path):
    p = run([script("loco-certs"), "--out", str(tmp_path / "certs"), "--sites", "eu", "us"],
            ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "site eu:" in p.stdout and (tmp_path / "certs" / "us" / "us.pem").is_file()
    again = run([script("loco-certs"), "--out", str(tmp_path / "certs"), "--sites", "eu"], ROOT)
    assert again.returncode == 2 and again.stderr.startswith("loco.certs: error:")
