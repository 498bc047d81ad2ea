"""DiLoCo's closing syncs in a codec of their own (``compression.closing_codec``).

At the last step DiLoCo syncs the progress no outer step took (a partial last round, the
fragments' tails; ``OuterLoop._close_tails``) and lands on the group's mean of it. Those syncs
happen once per run and nothing after them carries their coding error on, so they may travel
in a finer codec than the rounds: their delta and their slice averages in
``closing_codec``, encoded with the rounds' error-feedback residual added, so what the rounds
left unsent arrives too. The parts here are the rounds' (``Rounds`` without fragments,
``Fragments`` with them) built over the closing's :class:`RangePayloads`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loco.outer.exchange import RangePayloads
from loco.outer.fragments import Fragments
from loco.outer.round import Rounds
from loco.outer.sliced import SlicedReduce


def closing_parts(closing_for: Callable[..., RangePayloads], payloads: RangePayloads,
                  kw: dict[str, Any], *, fragments: int, sliced: bool,
                  leader: Callable[[list[str], int], str]) -> tuple[Rounds | Fragments,
                                                                    RangePayloads]:  # fmt: skip
    """The closing syncs' parts and their payloads. ``closing_for(None)`` builds the closing
    payloads of this rank's range, ``closing_for((a, b))`` a fragment piece's; ``payloads``
    are the rounds' (their residual is shared, not copied); ``kw``: the rounds' keywords."""
    own = closing_for(None)
    if payloads.ef is not None and own.ef is not None:
        own.ef.residual = payloads.ef.residual  # the rounds' unsent values go out with it
    kw = {**kw, "payloads": own}
    if fragments > 1:
        return Fragments(F=fragments, payloads_for=closing_for, sliced=sliced, **kw), own
    reduce = None
    if sliced:
        reduce = SlicedReduce(node=kw["node"], payloads=own, site=kw["site"],
                              P=kw["flat"].numel, pool=kw["pool"],
                              pull_timeout_s=kw["pull_timeout_s"])  # fmt: skip
    return Rounds(**kw, sliced=reduce, leader=leader), own
