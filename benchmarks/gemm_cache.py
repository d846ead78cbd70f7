"""Where the matrix products of a compiled training step lose their speed: each product's rate inside
the step (profiler, grouped by shape) against the same product alone, once with its operands in cache
and once after a pass over a buffer larger than the last-level cache.

    python -m benchmarks.gemm_cache                  # quickstart width, batch 64, 64 tokens (issue 20's shape)
    python -m benchmarks.gemm_cache --evict-mb 128   # a larger eviction buffer (CPUs with a bigger L3)

Layouts (strides) of the products alone are the ones the eager step passes to them (the first seen for a
shape: calls of one shape in the step can differ in layout). Writes
benchmarks/results/gemm_cache.{json,md}. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import machine
from benchmarks.run import QUICKSTART_64_TOKENS, _model
from ddt.checkpoint import atomic_write_bytes, atomic_write_json

PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class ProductLayouts(TorchDispatchMode):
    """Records (shapes, strides) of the two matrix operands of every mm/addmm it sees."""

    def __init__(self):
        super().__init__()
        self.seen: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            a, b = args[-2:]
            self.seen.setdefault((tuple(a.shape), tuple(b.shape)), (a.stride(), b.stride()))
        return func(*args, **(kwargs or {}))


def products_in_step(step: Callable[[], None], steps: int) -> dict[tuple, dict]:
    """Milliseconds and calls per step of each product shape ((m, k), (k, n)) in step (profiler self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    out: dict[tuple, dict] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm"):
            continue
        key = tuple(tuple(s) for s in event.input_shapes if len(s) == 2)[:2]  # addmm: bias is 1-d
        entry = out.setdefault(key, {"ms": 0.0, "calls": 0})
        entry["ms"] += event.self_cpu_time_total / steps / 1e3
        entry["calls"] += event.count // steps
    return out


def rate_alone(shapes: tuple, strides: tuple, evict: torch.Tensor | None, seconds: float = 0.5) -> float:
    """GFLOP/s of one product with the step's layouts; with `evict`, a pass over it before each call."""
    (m, k), (_, n) = shapes
    a, b = (torch.empty_strided(s, st).normal_() for s, st in zip(shapes, strides))
    total, calls, start = 0.0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 5:
        if evict is not None:
            evict.mul_(1.0)
        t0 = time.perf_counter()
        torch.mm(a, b)
        total += time.perf_counter() - t0
        calls += 1
    return 2 * m * k * n * calls / total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--evict-mb", type=int, default=64, help="eviction buffer; more than the last-level cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from ddt.models import compile_model

    model = _model(QUICKSTART_64_TOKENS, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch_size, 3, 16, 16, generator=g), torch.rand(args.batch_size, generator=g),
              torch.randint(0, 10, (args.batch_size,), generator=g))
    with ProductLayouts() as layouts:
        model(*inputs)[0].square().mean().backward()
    compiled = compile_model(model)
    step = lambda: compiled(*inputs)[0].square().mean().backward()  # noqa: E731
    for _ in range(3):  # compile, then the backward variants of the second step
        step()
    in_step = products_in_step(step, args.steps)
    evict = torch.ones(args.evict_mb * 2**18)
    rows = []
    for shapes, cost in sorted(in_step.items(), key=lambda kv: -kv[1]["ms"]):
        if shapes not in layouts.seen or cost["ms"] < 1.0:
            continue
        (m, k), (_, n) = shapes
        gflop = 2 * m * k * n * cost["calls"] / 1e9
        rows.append({"m": m, "k": k, "n": n, "calls": cost["calls"], "ms_in_step": cost["ms"],
                     "in_step": gflop / cost["ms"] * 1e3, "alone_warm": rate_alone(shapes, layouts.seen[shapes], None),
                     "alone_evicted": rate_alone(shapes, layouts.seen[shapes], evict)})
    result = {"machine": machine(torch.device("cpu")), "batch_size": args.batch_size, "evict_mb": args.evict_mb,
              "rows": rows}
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch "
             f"{result['machine']['torch']}; quickstart width, batch {args.batch_size}, 64 tokens, "
             f"`compile_model`; alone after evicting: a pass over {args.evict_mb} MB before each call.", "",
             "| product (m×k @ k×n) | calls/step | ms/step in the step | GFLOP/s in the step | alone, warm | "
             "alone, caches evicted |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['m']}×{r['k']} @ {r['k']}×{r['n']} | {r['calls']} | {r['ms_in_step']:.1f} | {r['in_step']:.0f} | "
              f"{r['alone_warm']:.0f} | {r['alone_evicted']:.0f} |" for r in rows]
    total_ms = sum(r["ms_in_step"] for r in rows)
    lines += ["", f"Shown: {total_ms:.0f} ms of products a step; at the warm rates alone they would take "
              f"{sum(r['ms_in_step'] * r['in_step'] / r['alone_warm'] for r in rows):.0f} ms, at the evicted rates "
              f"{sum(r['ms_in_step'] * r['in_step'] / r['alone_evicted'] for r in rows):.0f} ms.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, args.out / "gemm_cache.json")
    atomic_write_bytes(args.out / "gemm_cache.md", lambda f: f.write("\n".join(lines).encode()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
