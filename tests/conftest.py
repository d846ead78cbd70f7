"""Shared fixtures: offline environment, one feature-statistics cache per session, config composition."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"  # official outputs, see its README

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A cache shared by the whole session, so the digits reference features are extracted once."""
    path = tmp_path_factory.mktemp("ddt-cache")
    os.environ["DDT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def compose(cache_dir):
    """Compose the real Hydra config from conf/ with the given overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from ddt.config import register_resolvers

    register_resolvers()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose


def launch(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` as a user would; returns the finished process."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A tiny AutoencoderKL folder (save_pretrained), loaded as resolution.vae=PATH."""
    from tiny import save_tiny_vae
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny DINOv2-architecture ViT weights file, loaded as repa.target_weights=PATH."""
    from tiny import save_tiny_dinov2
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2.safetensors")


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 with random weights, passed as eval.inception_weights=PATH."""
    from tiny import save_random_inception
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception-random.pth")
