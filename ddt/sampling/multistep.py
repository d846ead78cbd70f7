"""Adams–Bashforth weights on any time grid: integrals of Lagrange basis polynomials, in float64.

Step i of an order-p sampler moves x by ∫_{t_i}^{t_{i+1}} P(t) dt, where P interpolates the last
k = min(p, i + 1) velocities v_{i-k+1} … v_i at their times. That integral is Σ_j w_j·v_j with w_j
the integral of the j-th Lagrange basis polynomial; dividing by (t_{i+1} − t_i) gives the weights of
the velocity used for the step, which sum to 1 (normalised, as the official pre_integral does, so
that only round-off is removed: the exact weights already sum to 1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_ORDER = 4


def lagrange_step_weights(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights of the values at `nodes` in the mean of their interpolating polynomial over [start, end]."""
    nodes = np.asarray(nodes, dtype=np.float64)
    # Gauss–Legendre with len(nodes) points integrates the degree len(nodes) − 1 basis exactly.
    u, g = np.polynomial.legendre.leggauss(max(1, len(nodes)))
    half = 0.5 * (end - start)
    t = start + half * (u + 1.0)
    weights = []
    for j, node in enumerate(nodes):
        others = np.delete(nodes, j)
        basis = np.prod((t[:, None] - others) / (node - others), axis=1)
        weights.append(float(half * np.dot(g, basis)))
    total = sum(weights)
    return [w / total for w in weights]


def adams_weights(times: Sequence[float], order: int) -> list[list[float]]:
    """Per step i, the weights of v_{i-k+1} … v_i (oldest first) with k = min(order, i + 1)."""
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"sampler.order={order} must be between 1 and {MAX_ORDER} (solver=adams)")
    times = [float(t) for t in times]
    out = []
    for i in range(len(times) - 1):
        k = min(order, i + 1)
        out.append(lagrange_step_weights(times[i - k + 1:i + 1], times[i], times[i + 1]))
    return out
