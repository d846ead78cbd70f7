"""Encoder sharing: at which sampling steps the condition encoder runs (paper §4.3).

Between two recompute steps the decoder reuses the encoder output of the last recompute step.
`uniform` recomputes every k = ceil(N / K) steps (the official `state_refresh_rate`); `dp` is the
paper's statistical dynamic programming: on a template batch sampled without sharing, measure the
mean cosine similarity of the encoder outputs of every pair of steps, then pick the K recompute
steps that minimise the total cosine distance between each step's fresh output and the reused one.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ddt.sampling.solvers import SamplingStats, sample

SHARING = ("none", "uniform", "dp")


def uniform_recompute_steps(num_steps: int, num_recompute: int) -> list[int]:
    """Steps 0, k, 2k, … with k = ceil(num_steps / num_recompute)."""
    _check(num_steps, num_recompute)
    return list(range(0, num_steps, math.ceil(num_steps / num_recompute)))


def cosine_similarity_matrix(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """N×N mean cosine similarity between the (B, tokens, D) encoder outputs of N steps."""
    flat = torch.stack([torch.nn.functional.normalize(s.float(), dim=-1).flatten(0, -2) for s in states])
    # flat: (N, B·tokens, D); mean over tokens of the per-token dot products.
    return torch.einsum("imd,jmd->ij", flat, flat) / flat.shape[1]


def dp_recompute_steps(similarity: torch.Tensor, num_recompute: int) -> list[int]:
    """The K recompute steps (0 among them) minimising Σ_i (1 − similarity[i, last recompute ≤ i])."""
    n = similarity.shape[0]
    _check(n, num_recompute)
    distance = 1.0 - similarity.double()  # row i = later step, column a = the step reused
    # seg[a, b] = cost of reusing step a for steps a .. b-1 (inf unless a < b).
    cum = torch.cat([torch.zeros(1, n, dtype=torch.float64), distance.cumsum(0)])  # (n+1, n)
    seg = cum.T - torch.diagonal(cum[:n])[:, None]  # (n, n+1): cum[b, a] - cum[a, a]
    seg = seg.masked_fill(torch.arange(n + 1)[None, :] <= torch.arange(n)[:, None], math.inf)
    # best[b] = cost of covering steps 0 .. b-1 with k segments; parents for backtracking.
    best = seg[0].clone()
    parents = []
    for _ in range(num_recompute - 1):
        candidates = best[:n, None] + seg  # (a, b): k-1 segments up to a, one segment a..b-1
        best, parent = candidates.min(0)
        parents.append(parent)
    steps, b = [], n
    for parent in reversed(parents):
        a = int(parent[b])
        steps.append(a)
        b = a
    return [0] + sorted(steps)


def schedule_cost(similarity: torch.Tensor, recompute_steps: Sequence[int]) -> float:
    """Total cosine distance Σ_i (1 − similarity[i, last recompute step ≤ i]) of a schedule."""
    recompute, cost, source = set(recompute_steps), 0.0, 0
    for i in range(similarity.shape[0]):
        source = i if i in recompute else source
        cost += 1.0 - float(similarity[i, source])
    return cost


def _check(num_steps: int, num_recompute: int | None) -> None:
    if num_recompute is None or not 1 <= num_recompute <= num_steps:
        raise ValueError(f"sampler.num_recompute={num_recompute} must be between 1 and "
                         f"sampler.num_steps={num_steps}")


def statistical_schedule(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor,
                         num_recompute: int, **sampler_kwargs) -> tuple[list[int], torch.Tensor]:
    """Sample a template batch without sharing, then choose recompute steps by `dp_recompute_steps`."""
    stats = SamplingStats()
    sample(model, noise, labels, recompute_steps=None, stats=stats, record_encoder=True, **sampler_kwargs)
    similarity = cosine_similarity_matrix(stats.encoder_outputs)
    return dp_recompute_steps(similarity, num_recompute), similarity
