"""Registers `hydra/launcher=submitit_slurm_detached` (Hydra imports every module under hydra_plugins)."""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class DetachedSlurmQueueConf(SlurmQueueConf):
    """Every key of submitit_slurm, unchanged; the launcher returns once the sweep is submitted."""

    _target_: str = "hydra_plugins.ddt_detached_launcher.launcher.DetachedSlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm_detached", node=DetachedSlurmQueueConf,
                             provider="ddt")
