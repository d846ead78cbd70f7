"""Encoder-sharing benchmark: sampling wall time for none / uniform / dp at several K against three
bounds with r = N / K — equal-cost blocks depth·r / (depth + decoder_depth·(r − 1)), the counted
FLOPs of an encoder and a decoder pass, and their measured times — plus how far each schedule's
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
from ddt.config import build_ddt
from ddt.models import DDT, build_model
from ddt.sampling import SamplingStats, sample, statistical_schedule, uniform_recompute_steps


def load_model(args) -> DDT:
    if args.ckpt:
        state = checkpoint.load(args.ckpt)
        model = build_model(**state["signature"])
        model.load_state_dict(state["ema"])
        return model.eval()
    torch.manual_seed(0)
    width = {"hidden_size": args.width} if args.width else {}  # the quickstart's own by default (conf/model)
    model = build_ddt("quickstart", in_channels=3, num_classes=10, patch_size=args.patch_size, **width)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero velocity
    return model.eval()


@torch.no_grad()
def pass_costs(model: DDT, x: torch.Tensor, labels: torch.Tensor, repeats: int = 5) -> dict:
    """FLOPs (torch's counter, attention included) and best wall time of one encoder pass and one decoder pass."""
    from benchmarks.flops import model_flops

    t = torch.full((len(x),), 0.5, device=x.device)
    encode = lambda: model.self_condition(model.encoder_output(x, t, labels), t)  # noqa: E731
    s = encode()
    decode = lambda: model(x, t, labels, s)  # noqa: E731
    out = {}
    for name, fn in (("encoder", encode), ("decoder", decode)):
        flops = model_flops(fn)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = {"flops": flops, "seconds": best}
    return out


def bound(encoder_cost: float, decoder_cost: float, r: float) -> float:
    """Speedup if the encoder ran once every r steps and nothing else cost time."""
    return (encoder_cost + decoder_cost) / (decoder_cost + encoder_cost / r)


def wall_time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="suite checkpoint to sample from (default: random weights)")
    parser.add_argument("--width", type=int, default=None, help="block width (default: conf/model/quickstart's)")
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--num-recompute", type=int, nargs="+", default=[125, 63, 50, 32])
    parser.add_argument("--template", type=int, default=8, help="dp template batch size")
    parser.add_argument("--repeats", type=int, default=2, help="best-of repeats per timing")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharing"))
    args = parser.parse_args()

    model = load_model(args)
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    noise = torch.randn(args.batch, model.in_channels, size, size, generator=g)
    labels = torch.arange(args.batch) % model.num_classes
    common = dict(num_steps=args.steps, cfg_scale=1.0)
    costs = pass_costs(model, noise, labels)
    schedules = [("none", list(range(args.steps)), None)]
    for k in args.num_recompute:
        seconds = time.perf_counter()
        dp_steps, _ = statistical_schedule(model, noise[: args.template], labels[: args.template], k, **common)
        seconds = time.perf_counter() - seconds
        schedules += [("uniform", uniform_recompute_steps(args.steps, k), None), ("dp", dp_steps, seconds)]
    # Repetitions interleave the schedules, so that drifts of the machine's speed hit all of them.
    times = [[] for _ in schedules]
    for _ in range(args.repeats):
        for i, (_, steps, _) in enumerate(schedules):
            times[i].append(wall_time(lambda: sample(model, noise, labels, recompute_steps=steps, **common)))
    base_time = min(times[0])
    base = sample(model, noise, labels, **common)
    rows = []
    for (name, steps, dp_seconds), runs in zip(schedules, times):
        seconds, r = min(runs), args.steps / len(steps)
        stats = SamplingStats()
        out = sample(model, noise, labels, recompute_steps=steps, stats=stats, **common)
        fresh = sample(model, noise, labels, recompute_steps=steps, fresh_timestep=True, **common)
        rows.append({"sharing": name, "K": len(steps), "ratio": round(1 - len(steps) / args.steps, 3),
                     "seconds": seconds, "all_seconds": runs, "speedup": base_time / seconds,
                     # blocks of equal cost: depth·r / (depth + decoder_depth·(r − 1))
                     "block_bound": bound(model.encoder_depth, model.decoder_depth, r),
                     "flop_bound": bound(costs["encoder"]["flops"], costs["decoder"]["flops"], r),
                     "time_bound": bound(costs["encoder"]["seconds"], costs["decoder"]["seconds"], r),
                     "mse_official": (out - base).pow(2).mean().item(),
                     "mse_fresh": (fresh - base).pow(2).mean().item(),
                     "encoder_passes_per_image": stats.encoder_passes / args.batch,
                     # the schedule is made once per evaluation: its cost in images of that evaluation
                     **({"dp_overhead_s": dp_seconds, "dp_overhead_images": dp_seconds / (seconds / args.batch)}
                        if dp_seconds is not None else {})})
        print(json.dumps(rows[-1]), flush=True)

    shape = f"{model.depth} blocks {model.encoder_depth}en{model.decoder_depth}de width {model.hidden_size}"
    setting = (f"model {'ckpt ' + args.ckpt if args.ckpt else f'random {shape}'}, "
               f"patch {model.patch_size}, {size}x{size}x{model.in_channels}, batch {args.batch}, "
               f"{args.steps} Euler steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    enc, dec = costs["encoder"], costs["decoder"]
    lines = [f"Setting: {setting}. One pass over the batch: encoder {enc['flops'] / 1e9:.2f} GFLOP "
             f"{1e3 * enc['seconds']:.1f} ms, decoder {dec['flops'] / 1e9:.2f} GFLOP {1e3 * dec['seconds']:.1f} ms "
             f"(a decoder block costs {dec['flops'] / model.decoder_depth / (enc['flops'] / model.encoder_depth):.2f}x "
             f"an encoder block: its adaLN is per token).", "",
             "| sharing | K | ratio | wall s | speedup | block bound | FLOP bound | pass-time bound "
             "| speedup / FLOP bound | MSE vs none (official) | MSE vs none (fresh_timestep) | dp overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        overhead = (f"{r['dp_overhead_s']:.2f} s = {r['dp_overhead_images']:.0f} images "
                    f"({100 * r['dp_overhead_images'] / 500:.1f}% of 500, {100 * r['dp_overhead_images'] / 50000:.2f}% "
                    f"of 50k)" if "dp_overhead_s" in r else "")
        lines.append(f"| {r['sharing']} | {r['K']} | {r['ratio']:.2f} | {r['seconds']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['block_bound']:.2f}x | {r['flop_bound']:.2f}x | {r['time_bound']:.2f}x "
                     f"| {r['speedup'] / r['flop_bound']:.2f} | {r['mse_official']:.2e} | {r['mse_fresh']:.2e} "
                     f"| {overhead} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json({"setting": setting, "pass_costs": costs, "rows": rows}, out.with_suffix(".json"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
