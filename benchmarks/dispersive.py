"""Overhead of the dispersive loss per training step: the same model and batch with and without it.

    python -m benchmarks.dispersive                       # the quickstart: 28 blocks of width 64, batch 64
    python -m benchmarks.dispersive --device cuda --width 768 --depth 12 --encoder-depth 8 --patch-size 2 \\
        --image-size 32 --channels 4 --batch 32          # DDT-B/2 on one GPU's share of ImageNet 256 latents

Each step is Trainer.train_step (forward, backward, fused AdamW, EMA) on one fixed batch; steps with
and without the loss alternate in one process, so a change of machine speed hits both alike, and the
overhead is the median of the paired differences. The loss alone (forward and backward of
ddt.flow.dispersive_loss on the captured block output's shape) is timed too: on a shared machine the
step difference drowns in noise long before the loss's own cost does. Writes
benchmarks/results/dispersive.{json,md}. Numbers, not assertions: docs/dispersive.md quotes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, sync
from ddt.data.pixels import ImageTensors
from ddt.flow import dispersive_loss
from ddt.models import build_model
from ddt.objective import DispersiveLoss, Objective
from ddt.train import Trainer, TrainConfig

RESULTS = Path(__file__).parent / "results"


def make_trainer(args, dispersive: bool, run_dir: Path) -> Trainer:
    """The model (seed 0) with or without the dispersive loss on block depth // 4."""
    torch.manual_seed(0)
    model = build_model("ddt", in_channels=args.channels, patch_size=args.patch_size, hidden_size=args.width,
                        num_heads=args.heads, depth=args.depth, encoder_depth=args.encoder_depth, num_classes=10)
    loss = DispersiveLoss(layer=args.depth // 4) if dispersive else None
    cfg = TrainConfig(max_steps=10**9, batch_size=args.batch, lr=1e-4, precision=args.precision)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.channels, args.image_size, args.image_size), generator=g,
                           dtype=torch.uint8)
    data = ImageTensors(images, torch.randint(0, 10, (args.batch,), generator=g))
    return Trainer(model.to(args.device), data, cfg, run_dir=run_dir, seed=0, objective=Objective(dispersive=loss),
                   progress=False)


def step_seconds(trainer: Trainer, batch: dict, device: torch.device) -> float:
    """Wall seconds of one synchronised training step."""
    sync(device)
    start = time.perf_counter()
    trainer.train_step(batch)
    sync(device)
    return time.perf_counter() - start


def loss_seconds(args, device: torch.device) -> float:
    """Wall seconds of the dispersive loss's forward and backward on one batch of block outputs."""
    tokens = (args.image_size // args.patch_size) ** 2
    z = torch.randn(args.batch, tokens, args.width, device=device, requires_grad=True)
    sync(device)
    start = time.perf_counter()
    dispersive_loss(z, 0.5).backward()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--encoder-depth", type=int, default=22)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="conf/train/quickstart.yaml's batch_size")
    parser.add_argument("--precision", default="auto", help="train.precision (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each variant (after 3 warm-up)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(args, name == "dispersive", Path(tmp) / name) for name in ("none", "dispersive")}
        batch = trainers["none"].dataset[list(range(args.batch))]
        times: dict[str, list[float]] = {name: [] for name in (*trainers, "loss alone")}
        for i in range(args.steps + 3):
            step = {name: step_seconds(trainer, batch, device) for name, trainer in trainers.items()}
            step["loss alone"] = loss_seconds(args, device)
            for name, seconds in step.items():
                if i >= 3:
                    times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    paired = [a - b for a, b in zip(times["dispersive"], times["none"])]
    overhead = statistics.median(paired)
    tokens = (args.image_size // args.patch_size) ** 2
    result = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()},
              "features_per_sample": tokens * args.width, "median_step_s": median,
              "overhead_s": overhead, "overhead_percent": 100 * overhead / median["none"],
              "overhead_quartiles_s": statistics.quantiles(paired, n=4),
              "quartiles_s": {name: statistics.quantiles(t, n=4) for name, t in times.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispersive.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| loss | median step (s) | quartiles (s) |", "|---|---|---|",
             *(f"| {name} | {median[name]:.4f} | {' / '.join(f'{q:.4f}' for q in result['quartiles_s'][name])} |"
               for name in times),
             "", f"Overhead of the dispersive loss: {overhead * 1000:+.1f} ms per step "
                 f"({result['overhead_percent']:+.1f}%; quartiles of the paired differences "
                 f"{' / '.join(f'{q * 1000:+.1f}' for q in result['overhead_quartiles_s'])} ms), "
                 f"the loss alone {median['loss alone'] * 1000:.2f} ms; median of {args.steps} steps each on "
                 f"{result['machine'].get('gpu') or result['machine']['cpu']} ({result['machine']['threads']} threads); "
                 f"batch {args.batch}, {tokens} tokens x width {args.width} = {tokens * args.width} features per sample."]
    (args.out / "dispersive.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
