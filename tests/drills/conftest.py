"""The drills' shared fault-free control run."""

from __future__ import annotations

import pytest

from tests.drills.common import SHORT, SITES3, distances, run_drill


@pytest.fixture(scope="session")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float | None]]:
    """Round -> consensus distance per site of a fault-free federation with the drills' short
    settings (``SHORT``, 3 sites): the healthy level the partition and payload drills must
    return to. Same seed, hence the same pairs round by round."""
    tmp = tmp_path_factory.mktemp("healthy")
    with pytest.MonkeyPatch.context() as mp:  # run_drill unsets LOCO_FAULTS inside it
        run_drill(tmp, SITES3, None, SHORT, mp)
    return {s: distances(tmp, s) for s in SITES3}
