"""How far apart random-pair outer steps leave the sites: a toy model, no training.

N sites; every round each site's delta is white noise (unit variance per coordinate: the part of
a site's inner progress its partner does not share), sites meet in random pairs, and each takes
the NoLoCo update in the chosen form (``loco.outer.methods.NoLoCo``). Prints one JSON line per
setting: the stationary variance of ``phi_i - mean(phi)`` over the second half of the rounds.

    python scripts/experiments/spread.py            # the table in docs/outer.md (~2 min)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loco.gossip.pairing import pairing as match  # noqa: E402
from loco.outer.methods import NoLoCo, OuterState  # noqa: E402

SETTINGS = [  # (consensus, nesterov, alpha, beta, gamma, meet_every, pairing)
    ("momentum", False, 0.5, 0.7, 0.7, 1, "random"),
    ("momentum", False, 0.5, 1.4, 1.0, 1, "random"),
    ("momentum", False, 0.9, 0.7, 1.0, 1, "random"),
    ("weights", False, 0.9, 0.7, 1.0, 1, "random"),
    ("weights", True, 0.9, 0.7, 1.0, 1, "random"),
    ("weights", True, 0.8, 0.7, 1.0, 1, "random"),
    ("stepped", True, 0.8, 0.7, 1.0, 1, "random"),
    ("stepped", True, 0.8, 0.7, 1.0, 2, "random"),
    ("stepped", True, 0.8, 0.7, 1.0, 1, "hypercube"),
    ("stepped", True, 0.8, 0.7, 1.0, 2, "hypercube"),
]


def pair_rounds(sites: int, rounds: int, dim: int, seed: int):
    """The toy's rounds: ``(t, noise, pairs)``, every site's white-noise delta of round ``t``
    and the round's random pairs ``(i, j)`` (``i`` leads in phi_rate.py's sequential exchange)."""
    rng = np.random.default_rng(seed)
    for t in range(rounds):
        noise = torch.from_numpy(rng.standard_normal((sites, dim)).astype(np.float32))
        perm = rng.permutation(sites)
        yield t, noise, [(int(perm[k]), int(perm[k + sites // 2])) for k in range(sites // 2)]


def spread(consensus: str, nesterov: bool, alpha: float, beta: float, gamma: float, *,
           sites: int = 4, rounds: int = 600, dim: int = 2000, seed: int = 0,
           meet_every: int = 1, pairing: str = "random") -> float:  # fmt: skip
    """Mean over the last half of the rounds of the variance of phi around the sites' mean.
    ``meet_every``: the pairs meet in rounds 0, N, 2N, ...; in the others each site steps
    alone (``outer.meet_every``). ``pairing="hypercube"``: the meetings' pairs are
    ``loco.gossip.pairing``'s hypercube matchings instead of the random ones."""
    names = [f"s{k:03d}" for k in range(sites)]
    step = NoLoCo(alpha=alpha, beta=beta, gamma=gamma, consensus=consensus, nesterov=nesterov)
    states = [OuterState.start(torch.zeros(dim)) for _ in range(sites)]
    acc = []
    for t, noise, pairs in pair_rounds(sites, rounds, dim, seed):
        # what each site exchanges: its phi, or (stepped) its phi after its own step
        phis = [step.consensus_point(s, noise[k]).clone() for k, s in enumerate(states)]
        if t % meet_every:
            pairs = [(k, k) for k in range(sites)]
        elif pairing == "hypercube":
            groups = match(seed, t // meet_every + 1, names, mode="hypercube")
            pairs = [(names.index(a), names.index(b)) for a, b in groups]
        for i, j in pairs:
            for me in dict.fromkeys((i, j)):
                # stepped: a site's own delta alone, and its point as the others see it
                deltas = [noise[me]] if not step.sends_delta else [noise[i], noise[j]]
                step.apply(torch.empty(dim), states[me], deltas, [phis[i], phis[j]],
                           own=phis[me])  # fmt: skip
        if t >= rounds // 2:
            all_phi = torch.stack([s.phi for s in states]).double()
            v = float((all_phi - all_phi.mean(0)).pow(2).mean())
            if not np.isfinite(v) or v > 1e12:
                return float("inf")
            acc.append(v)
    return float(np.mean(acc))


def main() -> None:
    for consensus, nesterov, a, b, g, every, pairing in SETTINGS:
        v = spread(consensus, nesterov, a, b, g, meet_every=every, pairing=pairing)
        print(json.dumps({"consensus": consensus, "nesterov": nesterov, "alpha": a, "beta": b,
                          "gamma": g, "meet_every": every, "pairing": pairing,
                          "effective_lr": round(b / (1 - a), 3), "spread_variance": v}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
