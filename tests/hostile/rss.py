"""Peak resident memory of a snippet run in a fresh Python process.

The child runs ``setup`` (imports, building inputs), records its VmHWM, runs ``code`` and
reports the growth of VmHWM: what ``code`` made the process hold at its peak, in MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PRELUDE = """
import json, sys
def _hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")
"""

_EPILOGUE = """
__after = _hwm_kib()
print("RSSJSON" + json.dumps({"before_kib": __before, "after_kib": __after, "out": __out}))
"""


def peak_growth_mib(setup: str, code: str, *, timeout_s: float = 120.0) -> tuple[float, object]:
    """Run ``setup`` then ``code`` in a child; return (peak RSS growth in MiB during ``code``,
    the value ``code`` assigned to ``__out`` (JSON-able), or None).

    ``code`` should catch the exceptions it expects and put a summary in ``__out``.
    Raises AssertionError with the child's stderr when the child fails.
    """
    src = "\n".join((
        _PRELUDE, textwrap.dedent(setup), "__out = None", "__before = _hwm_kib()",
        textwrap.dedent(code), _EPILOGUE,
    ))  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                       timeout=timeout_s, env=env, cwd=ROOT)  # fmt: skip
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RSSJSON")), None)
    assert p.returncode == 0 and line is not None, (
        f"child failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    )
    got = json.loads(line[len("RSSJSON") :])
    return (got["after_kib"] - got["before_kib"]) / 1024.0, got["out"]
