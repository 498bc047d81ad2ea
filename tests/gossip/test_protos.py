"""The committed stubs match the .proto files, and the protos are self-contained."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_protos_have_no_imports():
    for p in (ROOT / "protos" / "loco" / "v1").glob("*.proto"):
        assert "import " not in p.read_text(), f"{p.name} must be self-contained"


@pytest.mark.timeout(90)
def test_foreign_client_calls_hello_and_health(tmp_path, sites):
    """Stubs generated from the .proto files alone (as any other client would) interoperate."""
    from grpc_tools import protoc

    proto_dir = ROOT / "protos" / "loco" / "v1"
    args = ["protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    assert protoc.main(args + ["gossip.proto", "health.proto"]) == 0
    site = sites("us", 2, 100)
    site.servers[1].publish(3, "delta", bytes(range(200)))
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import grpc, gossip_pb2 as g, gossip_pb2_grpc as gg, health_pb2 as h, health_pb2_grpc as hg
        ch = grpc.insecure_channel({site.address!r})
        r = gg.GossipStub(ch).Hello(g.HelloRequest(run_id="x"), timeout=5)
        assert r.site == "us" and r.nproc == 2 and len(r.ranks) == 2, r
        s = hg.HealthStub(ch).Check(h.HealthCheckRequest(service="loco.v1.Gossip"), timeout=5)
        assert s.status == h.HealthCheckResponse.SERVING
        ch1 = grpc.insecure_channel(r.ranks[1].address)
        msgs = list(gg.GossipStub(ch1).Pull(g.PullRequest(run_id="run-test",
            layout_hash="layout-abc", round=3, stream="delta", lo=50, hi=100), timeout=5))
        assert msgs[0].header.lo == 50 and msgs[0].header.length == 200
        assert b"".join(m.data for m in msgs[1:]) == bytes(range(200))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_check_ignores_version_stamps_but_not_content():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.generate()
    assert gen.stale_files(files) == []
    restamped = {
        n: t.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9")
        for n, t in files.items()
    }
    assert gen.stale_files(restamped) == []
    changed = dict(files, **{"gossip_pb2.py": files["gossip_pb2.py"].replace("loco.v1", "loco.v2")})
    assert gen.stale_files(changed) == ["gossip_pb2.py"]
