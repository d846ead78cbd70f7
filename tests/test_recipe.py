"""docs/imagenet.md's table "The paper's recipe, setting by setting" against the composed paper studies."""
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from ddt.config import validate
from ddt.models import DDT
from ddt.train import Trainer, TrainConfig, autocast_dtype

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"suite xl_256": "+experiment=xl_256", "suite xl_512": "+experiment=xl_512"}


def recipe_rows() -> list[dict[str, str]]:
    """The table's rows as {column: cell}."""
    text = (ROOT / "docs" / "imagenet.md").read_text()
    section = text.split("## The paper's recipe, setting by setting", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def optimiser(plain: dict, tmp_path: Path) -> str:
    """The optimiser the trainer builds from the train group, checked to carry its lr, betas and decay."""
    model = DDT(in_channels=4, patch_size=2, hidden_size=32, num_heads=2, depth=2, encoder_depth=1, num_classes=10)
    train = plain["train"]
    trainer = Trainer(model, None, TrainConfig(**train, num_workers=0), run_dir=tmp_path, seed=0)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], list(group["betas"]), group["weight_decay"]) == (train["lr"], train["betas"],
                                                                          train["weight_decay"])
    return type(trainer.optimizer).__name__


def vae_scaling(plain: dict) -> float:
    """SD-VAE-ft-EMA's config.json sets no scaling_factor, so the codec reads diffusers' default."""
    from diffusers import AutoencoderKL

    assert plain["resolution"]["vae"] == "stabilityai/sd-vae-ft-ema"
    return inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default


# Suite settings that are no single config key: how each is computed from the composed config.
DERIVED = {
    "14 × `resolution.latent_size` / `model.patch_size`":  # DINOv2 patches: one token per DDT token
        lambda plain, tmp: 14 * plain["resolution"]["latent_size"] // plain["model"]["patch_size"],
    "`ddt.train.Trainer`'s optimiser": optimiser,
    "`train.precision` on a GPU": lambda plain, tmp: {torch.bfloat16: "bf16", None: "fp32"}[
        autocast_dtype(plain["train"]["precision"], torch.device("cuda"), plain["model"]["hidden_size"])],
    "`resolution.vae`'s `scaling_factor`": lambda plain, tmp: vae_scaling(plain),
}


def suite_value(plain: dict, key_cell: str, tmp_path: Path):
    """The composed value a row's `suite key` cell names: a dotted config key, or one of DERIVED."""
    if re.fullmatch(r"`[a-z_]+(\.[a-z_]+)+`", key_cell):
        value = plain
        for part in key_cell.strip("`").split("."):
            value = value[part]
        return value
    assert key_cell in DERIVED, f"docs/imagenet.md recipe row with suite key {key_cell!r}: add it to DERIVED"
    return DERIVED[key_cell](plain, tmp_path)


def test_the_table_covers_the_recipe():
    settings = {row["setting"] for row in recipe_rows()}
    for needed in ("model width", "REPA projector hidden width", "REPA align layer (1-based block)", "REPA loss weight",
                   "optimiser", "AdamW betas", "learning rate", "weight decay", "EMA decay", "label dropout (null label)",
                   "training-time distribution", "REPA target encoder", "DINOv2 input size (px)", "precision",
                   "global batch", "VAE", "latent scaling", "latent cache dtype"):
        assert needed in settings, needed


@pytest.mark.parametrize("column", sorted(STUDIES))
def test_suite_column_is_what_the_study_composes(compose, tmp_path, column):
    plain = validate(compose(STUDIES[column], "data.root=/datasets/imagenet/train", "ckpt=/weights/model.ckpt"))
    for row in recipe_rows():
        documented = yaml.safe_load(re.fullmatch(r"`([^`]*)`", row[column]).group(1))
        assert suite_value(plain, row["suite key"], tmp_path) == documented, (column, row["setting"])
