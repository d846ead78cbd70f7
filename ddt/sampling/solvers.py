"""Samplers from noise (t = 0) to data (t = 1): Euler, Heun, Euler–Maruyama and Adams–Bashforth on one loop.

Grid (official): linspace(0, 1 − last_step, N) then 1.0, respaced by t / (t + (1 − t)·timeshift).
Guidance v = v_u + w·(v_c − v_u) applies only where cfg_interval[0] < t < cfg_interval[1] (open
interval, as the official sampler); the unconditional decoder runs only there.
Encoder sharing: the encoder runs at `recompute_steps` (every evaluation of such a step) and its
output is reused until the next one. With `fresh_timestep` the reused encoder state h is combined
with the current step's timestep embedding instead of the recompute step's (the official reuse).
Adams–Bashforth of order p (`adams`) takes one evaluation per step and moves with the combination of
the last min(p, i + 1) guided velocities weighted by ddt.sampling.multistep (order 1 is Euler).
A model without a condition encoder (`model.decoupled` false: the SiT baseline) runs whole at every
evaluation; asking it for sharing is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ddt.sampling.multistep import adams_weights

SOLVERS = ("euler", "heun", "sde", "adams")


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


@dataclass
class SamplingStats:
    """Rows passed through encoder and decoder (a guided evaluation of B images passes 2B rows), and
    network evaluations per image summed over images (NFE: a guided evaluation counts once)."""

    encoder_passes: int = 0
    decoder_passes: int = 0
    evaluations: int = 0
    encoder_outputs: list = field(default_factory=list)  # s of the conditional half, if recorded


class GuidedVelocity:
    """v(x, t) with classifier-free guidance and the encoder-sharing cache of one sampling run."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, *, cfg_scale: float,
                 cfg_interval: Sequence[float], fresh_timestep: bool, stats: SamplingStats,
                 record: bool):
        self.model, self.labels = model, labels
        self.null = torch.full_like(labels, model.num_classes)
        self.cfg_scale, self.cfg_interval = cfg_scale, tuple(cfg_interval)
        self.fresh_timestep, self.stats, self.record = fresh_timestep, stats, record
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # half -> (h, s)

    def guided(self, t: float) -> bool:
        return self.cfg_scale != 1.0 and self.cfg_interval[0] < t < self.cfg_interval[1]

    def _batch(self, x: torch.Tensor, halves: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the halves ("uncond", "cond") in one batch (no copy for one half)."""
        if tuple(halves) == ("cond",):
            return x, self.labels
        return torch.cat([x, x]), torch.cat([self.null, self.labels])

    def encode(self, x: torch.Tensor, t: torch.Tensor, halves: Sequence[str], record: bool) -> None:
        """Run the encoder for the given halves and cache its output h and s = SiLU(t_emb + h)."""
        if not self.model.decoupled:
            return  # SiT: nothing to cache, every evaluation runs the whole network
        xs, y = self._batch(x, halves)
        tt = t.expand(len(y))
        h = self.model.encoder_output(xs, tt, y)
        s = self.model.self_condition(h, tt)
        self.cache.update(zip(halves, zip(h.chunk(len(halves)), s.chunk(len(halves)))))
        self.stats.encoder_passes += len(y)
        if record:
            self.stats.encoder_outputs.append(self.cache["cond"][1].cpu())

    def _self_condition(self, halves: Sequence[str], t: torch.Tensor) -> torch.Tensor:
        """The cached s of the halves; with fresh_timestep, the cached h with the current t."""
        if self.fresh_timestep:
            h = [self.cache[half][0] for half in halves]
            return self.model.self_condition(h[0] if len(h) == 1 else torch.cat(h), t)
        s = [self.cache[half][1] for half in halves]
        return s[0] if len(s) == 1 else torch.cat(s)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_value: float, encode_halves: Sequence[str],
                 first_of_step: bool = True) -> torch.Tensor:
        """Guided velocity at (x, t) (t_value: t as a float); first re-encode `encode_halves`."""
        if encode_halves:
            self.encode(x, t, encode_halves, record=self.record and first_of_step)
        halves = ("uncond", "cond") if self.guided(t_value) else ("cond",)
        xs, y = self._batch(x, halves)
        tt = t.expand(len(y))
        if self.model.decoupled:
            v, _ = self.model(xs, tt, y, self._self_condition(halves, tt))
        else:
            v, _ = self.model(xs, tt, y)
        self.stats.decoder_passes += len(y)
        self.stats.evaluations += len(x)
        if len(halves) == 1:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)


def step_noise(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped as x: from one generator, or image k's from generator[k]."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def _score(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇ log p_t(x) from the velocity on the linear path: (t·v − x) / (1 − t)."""
    return (t * v - x) / (1 - t)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int,
           solver: str = "euler", cfg_scale: float = 1.0, cfg_interval: Sequence[float] = (0.0, 1.0),
           timeshift: float = 1.0, last_step: float | None = None,
           recompute_steps: Iterable[int] | None = None, fresh_timestep: bool = False,
           sde_diffusion: float = 1.0, order: int | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           stats: SamplingStats | None = None, record_encoder: bool = False) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1); the encoder runs only at `recompute_steps`.

    `order` (1-4) is the Adams–Bashforth order of solver="adams" (default 2); other solvers take none.
    `generator` draws the SDE's step noise: one for the batch, or one per image (image k's noise from
    generator[k], so an image's path does not depend on the batch it is sampled in).
    """
    if solver not in SOLVERS:
        raise ValueError(f"sampler.solver={solver!r} is unknown; choose one of {SOLVERS}")
    if order is not None and solver != "adams":
        raise ValueError(f"sampler.order={order} is the order of solver=adams; solver={solver} has a fixed order")
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != len(noise):
        raise ValueError(f"{len(generator)} step-noise generators for {len(noise)} images; give one per image")
    grid = time_grid(num_steps, last_step, timeshift)
    # float64 weights from the float32 grid the network sees (the official grid is float32 too)
    weights = adams_weights(grid.tolist(), 2 if order is None else order) if solver == "adams" else None
    times, grid = grid.to(noise.device), grid.tolist()  # floats for decisions: no device syncs
    recompute = sorted(set(range(num_steps) if recompute_steps is None else recompute_steps))
    if not model.decoupled and len(recompute) != num_steps:
        raise ValueError(f"encoder sharing needs a decoupled model (DDT); {type(model).__name__} has no condition "
                         f"encoder to reuse: use sampler.sharing=none")
    if not recompute or recompute[0] != 0:
        raise ValueError("recompute_steps must contain step 0 (there is no encoder output to reuse yet)")
    velocity = GuidedVelocity(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                              fresh_timestep=fresh_timestep, stats=stats or SamplingStats(),
                              record=record_encoder)
    second_order = solver == "heun"
    # The unconditional encoder output is needed at a recompute step iff some evaluation before the
    # next recompute step is guided (the official sampler always keeps both halves).
    needs_uncond = {}
    for k, start in enumerate(recompute):
        stop = recompute[k + 1] if k + 1 < len(recompute) else num_steps
        eval_times = grid[start:stop + 1] if second_order else grid[start:stop]
        needs_uncond[start] = any(velocity.guided(t) for t in eval_times)

    x, history = noise, []  # history: the guided velocities a multistep solver still needs
    for i in range(num_steps):
        t, t_next = times[i], times[i + 1]
        dt, last = t_next - t, i == num_steps - 1
        halves = (("uncond", "cond") if needs_uncond[i] else ("cond",)) if i in needs_uncond else ()
        v = velocity(x, t, grid[i], halves).to(x.dtype)
        if solver == "heun" and not last:
            x_pred = x + v * dt
            v_next = velocity(x_pred, t_next, grid[i + 1], halves, first_of_step=False).to(x.dtype)
            x = x + 0.5 * (v + v_next) * dt
        elif solver == "adams":
            history = [*history, v][-len(weights[i]):]
            if len(history) > 1:  # one velocity (order 1, the first step) moves with v itself: exactly Euler
                v = sum(w * h for w, h in zip(weights[i], history))
            x = x + v * dt
        elif solver == "sde" and not last:
            w = sde_diffusion * (1 - t)  # diffusion coefficient, vanishing at the data end
            z = step_noise(x, generator)
            x = x + (v + w * _score(x, v, t)) * dt + torch.sqrt(2 * w * dt) * z
        else:  # Euler, and the deterministic last step of every solver
            x = x + v * dt
    return x
