"""What the benchmark scripts share: device synchronisation, the machine description, synthetic images.

Both benchmarks.run and benchmarks.imagenet import it; neither imports the other.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times cover it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def write_folder(root: Path, n: int, classes: int = 10) -> Path:
    """n random 375x500 JPEGs (ImageNet's typical size) in `classes` class folders under root; returns root."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(low).resize((500, 375), Image.BICUBIC).save(folder / f"{i}.JPEG", quality=90)
    return root
