"""Entry point: compose the Hydra config (conf/) and run its stages (ddt/runner.py).

    python launch.py                                   # the digits quickstart
    python launch.py -m model.encoder_depth=8,16,22    # a sweep, one run directory per value
    python launch.py stage=evaluate ckpt=PATH          # evaluate an existing checkpoint
    python launch.py stage=cache_latents resolution=r256 data.root=/imagenet/train   # SD-VAE latent cache
    python launch.py model=ddt_xl resolution=r256 repa=on data.root=/imagenet/train  # the paper's XL setting
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ddt.config import register_resolvers
from ddt.runner import run

register_resolvers()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Run one configured job in Hydra's output directory."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    return run(cfg, hydra_cfg.runtime.output_dir, sweep_dir=sweep_dir)


if __name__ == "__main__":
    main()
