"""``python -m loco.sim sites=N rounds=R key=value...``: one JSON line (exit 2 on a bad key)."""

from __future__ import annotations

import json
import sys

from loco.config import ConfigError

from .options import parse_args
from .run import simulate


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"loco.sim: {e}", file=sys.stderr)
        return 2
    print(json.dumps(simulate(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
