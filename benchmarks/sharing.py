"""Encoder-sharing benchmark: sampling wall time for none / uniform / dp at several K, against the
FLOP bound depth·r / (depth + decoder_depth·(r − 1)) with r = N / K, plus how far each schedule's
samples move from the unshared ones (official reuse vs `fresh_timestep`).

    python -m benchmarks.sharing                                  # random 28-block 22en6de model
    python -m benchmarks.sharing --ckpt runs/quickstart/default/checkpoints/last.pt

Writes benchmarks/results/sharing.{json,md}. Numbers, not assertions: see README for the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddt import checkpoint
from ddt.models import DDT
from ddt.sampling import SamplingStats, sample, statistical_schedule, uniform_recompute_steps


def build_model(args) -> DDT:
    if args.ckpt:
        state = checkpoint.load(args.ckpt)
        model = DDT(**state["signature"])
        model.load_state_dict(state["ema"])
        return model.eval()
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=args.patch_size, hidden_size=args.width, num_heads=4,
                depth=28, encoder_depth=22, num_classes=10)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero velocity
    return model.eval()


def timed_sample(model, noise, labels, repeats, **kwargs) -> tuple[float, torch.Tensor, SamplingStats]:
    """Best-of-`repeats` wall time of one sampling run."""
    best, out = float("inf"), None
    for _ in range(repeats):
        stats = SamplingStats()
        start = time.perf_counter()
        out = sample(model, noise, labels, stats=stats, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="suite checkpoint to sample from (default: random weights)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--num-recompute", type=int, nargs="+", default=[125, 63, 50, 32])
    parser.add_argument("--template", type=int, default=8, help="dp template batch size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharing"))
    args = parser.parse_args()

    model = build_model(args)
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    noise = torch.randn(args.batch, model.in_channels, size, size, generator=g)
    labels = torch.arange(args.batch) % model.num_classes
    common = dict(num_steps=args.steps, cfg_scale=1.0)
    base_time, base, base_stats = timed_sample(model, noise, labels, args.repeats, **common)
    rows = [{"sharing": "none", "K": args.steps, "ratio": 0.0, "seconds": base_time, "speedup": 1.0,
             "bound": 1.0, "efficiency": 1.0, "mse_official": 0.0, "mse_fresh": 0.0}]
    for k in args.num_recompute:
        start = time.perf_counter()
        dp_steps, _ = statistical_schedule(model, noise[: args.template], labels[: args.template], k, **common)
        dp_seconds = time.perf_counter() - start
        for name, steps in (("uniform", uniform_recompute_steps(args.steps, k)), ("dp", dp_steps)):
            seconds, out, stats = timed_sample(model, noise, labels, args.repeats, recompute_steps=steps, **common)
            fresh = sample(model, noise, labels, recompute_steps=steps, fresh_timestep=True, **common)
            r = args.steps / len(steps)
            bound = model.depth * r / (model.depth + model.decoder_depth * (r - 1))
            rows.append({"sharing": name, "K": len(steps), "ratio": round(1 - len(steps) / args.steps, 3),
                         "seconds": seconds, "speedup": base_time / seconds, "bound": bound,
                         "efficiency": base_time / seconds / bound,
                         "mse_official": (out - base).pow(2).mean().item(),
                         "mse_fresh": (fresh - base).pow(2).mean().item(),
                         "encoder_passes": stats.encoder_passes / args.batch,
                         # the schedule is made once per evaluation: its cost in images of that evaluation
                         **({"dp_overhead_s": dp_seconds, "dp_overhead_images": dp_seconds / (seconds / args.batch)}
                            if name == "dp" else {})})
            print(json.dumps(rows[-1]), flush=True)

    setting = (f"model {'ckpt ' + args.ckpt if args.ckpt else f'random 28 blocks 22en6de width {args.width}'}, "
               f"patch {model.patch_size}, {size}x{size}x{model.in_channels}, batch {args.batch}, "
               f"{args.steps} Euler steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [f"Setting: {setting}", "",
             "| sharing | K | ratio | wall s | speedup | FLOP bound | speedup/bound | MSE vs none (official) "
             "| MSE vs none (fresh_timestep) | dp overhead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        overhead = (f"{r['dp_overhead_s']:.2f} s = {r['dp_overhead_images']:.0f} images "
                    f"({100 * r['dp_overhead_images'] / 500:.1f}% of 500, {100 * r['dp_overhead_images'] / 50000:.2f}% "
                    f"of 50k)" if "dp_overhead_s" in r else "")
        lines.append(f"| {r['sharing']} | {r['K']} | {r['ratio']:.2f} | {r['seconds']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['bound']:.2f}x | {r['efficiency']:.2f} | {r['mse_official']:.2e} | {r['mse_fresh']:.2e} "
                     f"| {overhead} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json({"setting": setting, "rows": rows}, out.with_suffix(".json"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
