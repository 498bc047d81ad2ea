"""``loco.local`` without processes: the workers' overrides and the summary table."""

from __future__ import annotations

from pathlib import Path

from loco.config import compose
from loco.federation import free_base_ports, site_args, summarize, table


def test_site_args_for_known_and_new_sites(tmp_path):
    sites = ["eu", "us", "sa"]
    ports = {"eu": 41000, "us": 41010, "sa": 41020}
    user = ["train.steps=7", "hydra.run.dir=/x", "site=us", "site.nproc=2"]
    eu = site_args("eu", 0, sites, ports, user, tmp_path / "certs", threads=1)
    sa = site_args("sa", 2, sites, ports, user, None, threads=1)
    assert eu[0] == "+site=eu" and "site.name=eu" not in eu
    assert sa[:2] == ["+site=eu", "site.name=sa"]
    assert "site.listen=127.0.0.1:41020" in sa and "site.shard=2" in sa
    assert "site.peers=['eu=127.0.0.1:41000','us=127.0.0.1:41010']" in sa
    assert f"gossip.cert_dir={tmp_path / 'certs'}" in eu and not any("cert_dir" in a for a in sa)
    assert "train.steps=7" in eu and "site.nproc=2" in eu
    assert not any(a.startswith(("hydra", "site=")) for a in eu)
    assert "data.num_shards=3" in eu and "train.progress=false" in eu
    cfg = compose(sa)  # a valid worker configuration
    assert cfg.site.name == "sa" and cfg.site.nproc == 2 and cfg.site.peers[0].startswith("eu=")


def test_free_base_ports_leave_room_for_ranks():
    bases = free_base_ports(3, 4)
    assert len(set(bases)) == 3
    assert all(abs(a - b) >= 4 for a in bases for b in bases if a != b)


def test_table_of_finished_and_stopped_sites(tmp_path: Path):
    (tmp_path / "eu").mkdir()
    (tmp_path / "eu" / "summary.json").write_text(
        '{"steps": 10, "val_loss": 2.5, "rounds": 2, "rounds_dropped": 0, "bytes_sent": 1e6,'
        ' "ddp_bytes": 8e7, "compute_utilization": 0.95}'
    )
    rows = summarize(tmp_path, ["eu", "us"], {"eu": 0, "us": -2})
    text = table(rows)
    assert "2.5000" in text and "80x" in text and "95%" in text
    assert text.splitlines()[-1].startswith("us")
