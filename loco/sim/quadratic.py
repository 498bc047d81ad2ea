"""The cheap inner model: noisy SGD on per-site quadratics, all sites at once.

Site ``s`` minimises ``f_s(x) = 0.5 * sum_k a_k (x_k - c_{s,k})^2`` with curvatures ``a`` in
[0.1, 1] shared by all sites and optima ``c_s = c + hetero * z_s`` (``z_s`` standard normal):
the federation's optimum is the mean of the ``c_s``. A gradient carries ``noise * N(0, 1)`` per
coordinate. ``loss`` is the federation's objective at each site's phi, averaged over sites,
minus its minimum (0 at the optimum).
"""

from __future__ import annotations

import torch


class Quadratic:
    def __init__(self, sites: int, dim: int, *, hetero: float, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.a = torch.linspace(0.1, 1.0, dim)
        centre = torch.randn(dim, generator=self.gen) * 3
        self.c = centre + hetero * torch.randn(sites, dim, generator=self.gen)
        self.c_mean = self.c.mean(0)

    def start(self) -> torch.Tensor:
        """The common starting point (phi and theta of every site at round 0)."""
        return torch.zeros_like(self.c_mean)

    def inner(self, live: list[int], phis: dict[int, torch.Tensor], o, r: int) -> dict:
        """``o.inner_steps`` SGD steps from each live site's phi; returns its delta
        (theta after the steps minus phi), fp32."""
        idx = torch.tensor(live)
        phi = torch.stack([phis[i] for i in live])
        x = phi.clone()
        c = self.c[idx]
        for _ in range(o.inner_steps):
            noise = torch.randn(x.shape, generator=self.gen) * o.noise
            x -= o.inner_lr * (self.a * (x - c) + noise)
        delta = x - phi
        return {i: delta[k].clone() for k, i in enumerate(live)}

    def loss(self, phis: list[torch.Tensor]) -> float:
        x = torch.stack(phis)
        return float((0.5 * self.a * (x - self.c_mean) ** 2).sum(1).mean())
