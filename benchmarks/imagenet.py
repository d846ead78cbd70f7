"""ImageNet-path costs: latent-cache throughput (SD-VAE encoder) and REPA's training-step overhead.

The real architectures with random weights (SD-VAE-ft-EMA's AutoencoderKL configuration, DINOv2-B/14
through timm, the DDT presets) so that nothing needs downloading; the numbers are speeds only.

    python -m benchmarks.imagenet                                   # this CPU, small sizes
    python -m benchmarks.imagenet --device cuda --model XL --image-size 256 --batch-size 32 \\
        --cache-images 512 --cache-batch-size 64 --workers 8

Writes benchmarks/results/imagenet-<device>-r<size>.{json,md}. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, sync, write_folder
from ddt.data.imagenet import ImageFolder
from ddt.data.latents import LatentDataset, cache_latents
from ddt.config import build_ddt, model_group
from ddt.models.repa import RepaLoss, TargetEncoder
from ddt.models.vae import LatentCodec
from ddt.objective import Objective

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)


def bench_cache(args, device: torch.device, tmp: Path) -> dict:
    """Images/s of the whole cache stage (decode + crop + encode + shard writes) and of the encoder alone."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKL(**SD_VAE_CONFIG), name="sd-vae-ft-ema (random weights)").to(device)
    folder = ImageFolder(write_folder(tmp / "images", args.cache_images), args.image_size)
    images = torch.stack([folder[i][0] for i in range(args.cache_batch_size)]).to(device)
    codec.moments(images[:2])  # warm-up
    sync(device)
    start = time.perf_counter()
    codec.moments(images)
    sync(device)
    encoder_ips = len(images) / (time.perf_counter() - start)
    stats = cache_latents(folder, codec, tmp / "latents", shard_size=args.cache_batch_size * 2,
                          batch_size=args.cache_batch_size, device=device, num_workers=args.workers,
                          progress=False)
    dataset = LatentDataset(tmp / "latents")
    idx = torch.randperm(len(dataset))[: args.batch_size]
    start, reads = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        dataset[idx]
        reads += 1
    read_ips = reads * len(idx) / (time.perf_counter() - start)
    return {"images": stats["images_encoded"], "cache_images_per_s": round(stats["images_per_s"], 2),
            "encoder_images_per_s": round(encoder_ips, 2), "latent_read_images_per_s": round(read_ips, 1),
            "vae_parameters": sum(p.numel() for p in codec.parameters())}


def step_time(model, objective, batch, device, steps: int, autocast: torch.dtype | None) -> float:
    """Median seconds of one training step (forward, backward, AdamW) after two warm-up steps."""
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss, _ = objective(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_repa(args, device: torch.device, tmp: Path) -> dict:
    """Training-step time of a DDT preset on cached latents, without and with REPA (DINOv2-B/14)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dinov2 = timm.create_model("vit_base_patch14_dinov2", pretrained=False)
    weights = tmp / "dinov2-b14-random.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2.state_dict().items()}, str(weights))
    latent = args.image_size // 8
    model = build_ddt(args.model, in_channels=4, num_classes=1000).to(device)
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(args.batch_size, 4, latent, latent, generator=g),
             "std": torch.rand(args.batch_size, 4, latent, latent, generator=g) * 0.1,
             "labels": torch.randint(0, 1000, (args.batch_size,), generator=g),
             "images": torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=g,
                                     dtype=torch.uint8)}
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.bfloat16 if device.type == "cuda" else None
    plain = Objective(scaling_factor=0.18215)
    target = TargetEncoder("vit_base_patch14_dinov2", str(weights), grid_size=latent // 2)
    align = model_group(args.model)["repa_align_layer"]  # conf/model's block for this size
    repa = Objective(scaling_factor=0.18215, repa=RepaLoss(target, hidden_size=model.hidden_size,
                                                           align_layer=align)).to(device)
    without = step_time(model, plain, batch, device, args.steps, autocast)
    with_repa = step_time(model, repa, batch, device, args.steps, autocast)
    return {"model": f"DDT-{args.model}/2", "tokens": (latent // 2) ** 2, "batch_size": args.batch_size,
            "precision": "bf16 autocast" if autocast else "fp32", "step_s_without_repa": round(without, 4),
            "step_s_with_repa": round(with_repa, 4), "repa_overhead": round(with_repa / without - 1, 4),
            "images_per_s_without_repa": round(args.batch_size / without, 2),
            "images_per_s_with_repa": round(args.batch_size / with_repa, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache-images", type=int, default=16)
    parser.add_argument("--cache-batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(device), "image_size": args.image_size,
                  "cache": bench_cache(args, device, Path(tmp)), "repa": bench_repa(args, device, Path(tmp))}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"imagenet-{device.type}-r{args.image_size}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    c, r = result["cache"], result["repa"]
    md = [f"Machine: {result['machine']}, {args.image_size} px", "",
          "| latent cache (stage) img/s | VAE encoder img/s | latent reads img/s |", "|---|---|---|",
          f"| {c['cache_images_per_s']} | {c['encoder_images_per_s']} | {c['latent_read_images_per_s']} |", "",
          "| model | tokens | batch | precision | step without REPA | step with REPA | overhead |",
          "|---|---|---|---|---|---|---|",
          f"| {r['model']} | {r['tokens']} | {r['batch_size']} | {r['precision']} | {r['step_s_without_repa']} s | "
          f"{r['step_s_with_repa']} s | {100 * r['repa_overhead']:.1f}% |"]
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
