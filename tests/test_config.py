"""Composition of every config group with the real Hydra, and errors that name the key at fault."""
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf.errors import InterpolationResolutionError

from conftest import ROOT
from ddt.config import build_network, model_group, sampler_kwargs, stages, validate

GROUPS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
          for group in ("model", "resolution", "data", "train", "sampler", "eval", "logger", "repa", "baseline")}


def test_every_group_has_options():
    assert GROUPS["model"] == ["ddt_b", "ddt_b_dh", "ddt_l", "ddt_l_dh", "ddt_s", "ddt_s_dh", "ddt_xl", "ddt_xl_dh",
                               "quickstart"]
    assert {"default", "quickstart", "smoke"} <= set(GROUPS["train"])
    assert {"fid_digits", "fid_imagenet", "none"} <= set(GROUPS["eval"])


# Options that only make sense with others (ImageNet data lives in latent space and needs its folder).
COMPANIONS = {("data", "imagenet"): ["resolution=r256", "data.root=/datasets/imagenet/train"],
              ("data", "imagenet_latents"): ["resolution=r256"], ("data", "digits"): ["resolution=r16"]}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(compose, group, option):
    cfg = compose(*COMPANIONS.get((group, option), []), f"{group}={option}")
    plain = validate(cfg)
    assert plain[group] is not None if group != "baseline" else plain["model"]["arch"] in ("ddt", "sit")
    if group == "model":
        m = plain["model"]
        preset = model_group(m["preset"], in_channels=m["in_channels"], num_classes=m["num_classes"])
        assert {k: m[k] for k in preset} == preset  # the preset by name is the file Hydra composes
        assert m["decoder_depth"] == m["depth"] - m["encoder_depth"]


def test_quickstart_defaults(compose):
    plain = validate(compose())
    assert build_network(plain).config == dict(arch="ddt", in_channels=3, patch_size=4, hidden_size=64, num_heads=4, depth=28,
                                       encoder_depth=22, num_classes=10, norm="rmsnorm", ffn="swiglu", pos="rope",
                                       qk_norm=True, decoder_hidden_size=None, decoder_num_heads=None,
                                               prediction="v")
    assert plain["model"]["decoder_depth"] == 6
    assert stages(compose()) == ["train", "sample", "evaluate"]
    assert sampler_kwargs(plain)["num_steps"] == 16


def test_overrides_and_derived_decoder_depth(compose):
    plain = validate(compose("model.encoder_depth=8", "stage=[evaluate,train]"))
    assert plain["model"]["decoder_depth"] == 20
    assert stages(compose("stage=sample")) == ["sample"]
    assert stages(compose("stage=[evaluate,train]")) == ["train", "sample", "evaluate"]


@pytest.mark.parametrize("overrides,message", [
    (["model.encoder_depth=28"], "model.encoder_depth=28"),
    (["model.encoder_depth=0"], "model.encoder_depth=0"),
    (["model.patch_size=3"], "model.patch_size=3"),
    (["model.num_heads=5"], "model.num_heads=5"),
    (["stage=[train,finetune]"], "finetune"),
    (["eval.num_samples=0"], "eval.num_samples=0"),
])
def test_invalid_values_name_the_key(compose, overrides, message):
    with pytest.raises((ValueError, InterpolationResolutionError), match=message.replace("[", r"\[")):
        validate(compose(*overrides))


def test_unknown_option_lists_the_choices(compose):
    with pytest.raises(MissingConfigException, match="ddt_huge"):
        compose("model=ddt_huge")


def test_run_folder_names_are_flat_and_bounded():
    from ddt.config import run_subdir

    assert run_subdir("") == "default"
    assert run_subdir("model.encoder_depth=8") == "model.encoder_depth=8"
    assert "/" not in run_subdir("ckpt=runs/a/checkpoints/last.pt,sampler.cfg_scale=1.5")
    # sharing=none ignores num_recompute, so the folder is not named after it (a sweep over sharing keeps it)
    assert run_subdir("sampler.num_recompute=10,sampler.sharing=none") == "sampler.sharing=none"
    assert run_subdir("sampler.num_recompute=10,sampler.sharing=dp") == "sampler.num_recompute=10,sampler.sharing=dp"
    long = run_subdir("x=" + "a" * 400)
    assert len(long) == 200 and long != run_subdir("x=" + "a" * 399)


@pytest.mark.parametrize("overrides,message", [
    (["sampler.sharing=dp"], "sampler.num_recompute"),
    (["sampler.sharing=uniform", "sampler.num_recompute=17"], "sampler.num_recompute between 1 and sampler.num_steps=16"),
    (["sampler.sharing=every_other"], "sampler.sharing='every_other'"),
    (["sampler.solver=rk4"], "sampler.solver='rk4'"),
])
def test_invalid_sampler_settings_name_the_key(compose, overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        validate(compose(*overrides))


def test_sampler_groups(compose):
    heun = sampler_kwargs(validate(compose("sampler=heun")))
    sde = sampler_kwargs(validate(compose("sampler=sde", "sampler.sde_diffusion=0.5")))
    assert heun["solver"] == "heun" and "sde_diffusion" not in heun
    assert sde["solver"] == "sde" and sde["sde_diffusion"] == 0.5
