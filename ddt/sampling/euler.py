"""Euler ODE sampling on the official DDT time grid, with classifier-free guidance and encoder reuse.

Grid: linspace(0, 1 − last_step, N) then 1.0, respaced by t / (t + (1 − t)·timeshift).
Guidance v = v_u + w·(v_c − v_u) applies only at steps with cfg_interval[0] < t < cfg_interval[1]
(strict, as the official sampler); the unconditional half of the batch runs only at those steps.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn


def time_grid(num_steps: int, last_step: float | None = None, timeshift: float = 1.0) -> torch.Tensor:
    """The N + 1 times visited by an N-step sampler, from 0 (noise) to 1 (data)."""
    if num_steps < 1:
        raise ValueError(f"sampler.num_steps={num_steps} must be at least 1")
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    if not 0 < last_step <= 1:
        raise ValueError(f"sampler.last_step={last_step} must be in (0, 1]")
    t = torch.cat([torch.linspace(0.0, 1.0 - last_step, num_steps), torch.tensor([1.0])])
    return t / (t + (1 - t) * timeshift)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int,
           cfg_scale: float = 1.0, cfg_interval: Sequence[float] = (0.0, 1.0), timeshift: float = 1.0,
           last_step: float | None = None, recompute_steps: Iterable[int] | None = None) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1); the encoder runs only at `recompute_steps`."""
    times = time_grid(num_steps, last_step, timeshift).to(noise.device)
    recompute = set(range(num_steps)) if recompute_steps is None else set(recompute_steps)
    if 0 not in recompute:
        raise ValueError("recompute_steps must contain step 0 (there is no encoder output to reuse yet)")
    null = torch.full_like(labels, model.num_classes)
    x = noise
    cached = {}  # "cond"/"uncond" -> encoder output s from the last recompute step
    for i in range(num_steps):
        t, dt = times[i], times[i + 1] - times[i]
        guided = cfg_scale != 1.0 and cfg_interval[0] < t.item() < cfg_interval[1]
        halves = ("uncond", "cond") if guided else ("cond",)
        reuse = i not in recompute and all(h in cached for h in halves)
        s = torch.cat([cached[h] for h in halves]) if reuse else None
        y = torch.cat([null, labels]) if guided else labels
        v, s = model(x.repeat(len(halves), 1, 1, 1), t.expand(len(y)), y, s)
        if not reuse:
            cached.update(zip(halves, s.chunk(len(halves))))
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = x + v.to(x.dtype) * dt
    return x
