"""The plausibility bound: a partner's finite payload far outside what training produces.

A partner's finite payload is still refused when it is far outside what training produces: its
delta more than MAX_DELTA_RATIO times this site's own (same optimizer, same steps), or its phi
farther from this site's phi than MAX_PHI_GAP times the RMS of this site's phi (sites that share
an init stay within a few percent of each other; even two independent random inits are only
sqrt(2) apart). Garbage of any finite size (1e30, random words) is never applied.
"""

from __future__ import annotations

import torch

MAX_DELTA_RATIO = 100.0
MAX_PHI_GAP = 10.0


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0


def implausible(
    delta: torch.Tensor, phi: torch.Tensor, own_delta: torch.Tensor, own_phi: torch.Tensor
) -> str:
    """Why a partner's decoded (finite) ``delta`` / ``phi`` must not be applied, or ``""``."""
    rd, own_rd = _rms(delta), _rms(own_delta)
    if rd > MAX_DELTA_RATIO * own_rd + 1e-12:
        return f"delta RMS {rd:.3g} is over {MAX_DELTA_RATIO:g}x this site's {own_rd:.3g}"
    return implausible_phi(phi, own_phi)


def implausible_phi(phi: torch.Tensor, own_phi: torch.Tensor) -> str:
    """Why a partner's decoded (finite) weights ``phi`` must not be applied, or ``""``."""
    gap, own_rp = _rms(phi - own_phi), _rms(own_phi)
    if gap > MAX_PHI_GAP * own_rp + 1e-12:
        return (
            f"phi is {gap:.3g} (RMS) from this site's, over {MAX_PHI_GAP:g}x its RMS {own_rp:.3g}"
        )
    return ""
