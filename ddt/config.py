"""Checks and conversions between a composed OmegaConf config and the library's plain arguments.

The library below this module takes plain Python values; this is the one place that knows the
config's key names. `validate` checks every key against the schema (ddt.schema: types, choices,
ranges, unknown keys) and then the rules that span keys, and reports all problems together as one
UsageError, one line each, naming the key at fault.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddt.errors import UsageError
from ddt.schema import (RootSchema, check_types, decoder_depth, has_encoder, head_problems, later_keys, rungs_problem,
                        split_problem)

if TYPE_CHECKING:
    from torch import nn

STAGES = ("cache_latents", "train", "curve", "sample", "evaluate")

# The identity rule, written once (config_id here, run folder names in conf/config.yaml's
# override_dirname.exclude_keys, docs/running.md "What names a run"). A run is defined by its model,
# data, training recipe, sampler and evaluation protocol; these keys only say how or where it ran, so
# runs that differ in them compute the same numbers. A group name stands for all of its keys.
# train.max_steps is here because a run is a prefix of a longer run of its recipe (the data order and
# the constant learning rate do not depend on it): runs of one recipe are compared at a common step.
# ckpt: the weights a run starts from or samples are recorded beside its results (analysis.results).
# eval.num_samples is not here: FID's value depends on it.
# halving: a study's points train to each rung in turn (train.max_steps), so a point is the same run at every
# rung, and the same run as the full grid's point of its configuration (docs/halving.md).
HOW_IT_RAN_KEYS = (
    "name", "stage", "ckpt", "device", "progress", "logger", "tags", "cache_dir", "hydra", "cluster", "halving",
    "train.max_steps", "train.ckpt_every", "train.keep_every", "train.log_every", "train.compile",
    "train.activation_checkpointing",
    "data.root", "data.latents_dir", "data.num_workers", "data.shard_size", "data.cache_batch_size",
    "data.cache_rank", "data.cache_world_size",
    "sampler.batch_size", "sampler.compile",
    "eval.every_steps", "eval.curve_num_samples", "eval.feature_batch_size", "eval.inception_weights",
    "eval.reference_npz", "eval.dinov2_weights",
    "repa.target_weights",
)
# Not how it ran, but the one key whose runs form the interval of a setting: out of config_id only.
SEED_KEY = "seed"


def how_it_ran(key: str) -> bool:
    """Whether a dotted key (`train.log_every`, `+cluster`, `logger.mode`) only says how or where a run ran."""
    key = key.lstrip("+~")
    return any(key == k or key.startswith(f"{k}.") for k in HOW_IT_RAN_KEYS)


def _depth(encoder_depth: int, decoder_depth: int) -> int:
    """`${ddt.depth:...}`: encoder_depth + decoder_depth, for a study that sweeps the decoder's depth."""
    return int(encoder_depth) + int(decoder_depth)


# The run folder rule, the same rule read the other way: a folder is named by the overrides that define the
# experiment, the seed, and `ckpt` (the weights a sampling run uses); keys that only say how or where it ran
# (HOW_IT_RAN_KEYS: `+cluster`, `hydra.launcher.*`, `train.max_steps`, `eval.every_steps`, ...) are left out,
# so the same experiment always lands in the same folder: raising train.max_steps extends it in place.
NAMED_THOUGH_HOW_IT_RAN = ("ckpt",)


def names_run(key: str) -> bool:
    """Whether an override of `key` is part of the run folder's name (see HOW_IT_RAN_KEYS)."""
    key = key.lstrip("+~")
    return key in NAMED_THOUGH_HOW_IT_RAN or not (how_it_ran(key) or key.startswith("hydra/"))


def run_subdir(overrides, max_length: int = 200) -> str:
    """A flat folder name for a run from its task overrides (a list, or Hydra's `a=1,b=2`; `default` when none
    names it): the overrides that names_run, sorted as Hydra's override_dirname sorts them."""
    items = list(overrides) if not isinstance(overrides, str) else overrides.split(",") if overrides else []
    return _folder_name([str(i) for i in items if names_run(str(i).split("=", 1)[0])], max_length)


# The keys the run folder rule before this one left out of names (conf/config.yaml's exclude_keys then).
OLD_UNNAMED_KEYS = ("stage", "progress", "device", "name", "logger", "logger.mode", "cache_dir", "tags")


def old_run_subdir(overrides, max_length: int = 200) -> str:
    """The folder name the earlier rule gave a run (every override but OLD_UNNAMED_KEYS): to find runs made under it."""
    keys = [(str(i), str(i).split("=", 1)[0]) for i in overrides]  # Hydra named runs by task overrides: no hydra.*
    return _folder_name([i for i, k in keys if k not in OLD_UNNAMED_KEYS and not k.startswith("hydra")], max_length)


def _folder_name(items: list[str], max_length: int) -> str:
    items = sorted(items)
    if "sampler.sharing=none" in items:  # num_recompute means nothing without sharing: not in the name
        items = [i for i in items if not i.startswith("sampler.num_recompute=")]
    name = ",".join(items).replace("/", "_").replace("\\", "_") or "default"
    if len(name) > max_length:  # file systems stop at 255 bytes per name
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: max_length - 11]}-{digest}"
    return name


def _required(key: str, what: str) -> None:
    """`${ddt.required:KEY,WHAT}`: a value the command line must give (OmegaConf's ??? is lost in merges)."""
    raise UsageError(f"{key} is required here: pass {key}=... ({what})")


def register_resolvers() -> None:
    """Resolvers the config files use: ddt.decoder_depth, ddt.depth, ddt.run_subdir, ddt.required (idempotent)."""
    for name, fn in (("ddt.decoder_depth", decoder_depth), ("ddt.depth", _depth), ("ddt.run_subdir", run_subdir),
                     ("ddt.required", _required)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def digest(obj) -> str:
    """12 hex digits of the SHA-256 of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def comparable(plain: dict) -> dict:
    """The resolved config without the keys added later (ddt.schema.later_keys) that hold their old-behaviour value (a copy)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in plain.items()}
    for dotted, value in later_keys().items():
        *group, name = dotted.split(".")
        node = out.get(group[0]) if group else out
        if isinstance(node, dict) and name in node and node[name] == value:
            del node[name]
    return out


def experiment(plain: dict, without: tuple[str, ...] = ()) -> dict:
    """The resolved config without the how_it_ran keys, the seed and `without` (dotted keys): what defines the experiment."""
    def keep(key: str) -> bool:
        return not (how_it_ran(key) or key == SEED_KEY or any(key == w or key.startswith(f"{w}.") for w in without))

    return {group: ({k: v for k, v in value.items() if keep(f"{group}.{k}")} if isinstance(value, Mapping) else value)
            for group, value in comparable(plain).items() if keep(group)}


def config_id(plain: dict) -> str:
    """Hash of what defines the experiment (see HOW_IT_RAN_KEYS), the seed excluded: the group of a run's seeds."""
    return digest(experiment(plain))


def stages(cfg: DictConfig) -> list[str]:
    """`stage` as a list in pipeline order (evaluate implies sample); a name or a list is accepted."""
    value = cfg.stage
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UsageError(f"stage={OmegaConf.to_yaml(value).strip()} has unknown stage(s) {unknown}; "
                         f"use any of {list(STAGES)}")
    if "evaluate" in names:
        names.append("sample")  # evaluation needs samples; images already written are kept
    return [s for s in STAGES if s in names]


def validate(cfg: DictConfig) -> RootSchema:
    """Check every key (the schema) and every rule across keys; returns the typed config (ddt.schema's groups).

    All problems are raised together as one UsageError, one line each.
    """
    register_resolvers()
    problems, failed = check_types(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        todo = stages(cfg)
        across = [*check_model(plain), *check_train(plain), *check_sampler(plain), *check_curve(plain, todo),
                  *check_fd_dinov2(plain), *check_data(plain, todo), *check_dispersive(plain), *check_halving(plain)]
    except Exception:  # a key of the wrong type breaks a rule's arithmetic: that key is reported already
        if not problems:
            raise
        across = []
    # a rule that involves a key reported above would only repeat it
    problems += [p for p in across if not any(f"{key}=" in p for key in failed)]
    if problems:
        raise UsageError(problems)
    return RootSchema.from_plain(plain)


def check_model(plain: dict) -> Iterator[str]:
    """The depth split, the patch grid and the head width."""
    model, res = plain["model"], plain["resolution"]
    if split := split_problem(model["depth"], model["encoder_depth"]):
        yield split
    if res["latent_size"] % model["patch_size"]:
        yield (f"resolution.latent_size={res['latent_size']} is not divisible by model.patch_size="
               f"{model['patch_size']}; pick another patch size or resolution")
    sizes = [("", model["hidden_size"], model["num_heads"])]  # (key prefix, width, heads): encoder, decoder
    decoder = {k: model[k] for k in ("decoder_hidden_size", "decoder_num_heads") if model.get(k) is not None}
    if headless := head_problems(model["arch"], model.get("decoder_hidden_size"), model.get("decoder_num_heads")):
        yield from headless
    elif decoder:
        sizes.append(("decoder_", decoder.get("decoder_hidden_size", model["hidden_size"]),
                      decoder.get("decoder_num_heads", model["num_heads"])))
    for prefix, width, heads in sizes:
        if width % heads or (width // heads) % 4:
            yield (f"model.{prefix}hidden_size={width} / model.{prefix}num_heads={heads} must give a "
                   f"head width that is a multiple of 4 (2-D RoPE); pick another model.{prefix}num_heads")
    repa, width = plain["repa"], sizes[-1][1]
    if repa["enabled"] and width != model["hidden_size"] and (repa.get("align_layer") or 0) > model["encoder_depth"]:
        yield (f"repa.align_layer={repa['align_layer']} is a block of the decoder (model.decoder_hidden_size="
               f"{width}), but the REPA projector reads model.hidden_size={model['hidden_size']}: align an "
               f"encoder block, 1 to model.encoder_depth={model['encoder_depth']}")


def check_train(plain: dict) -> Iterator[str]:
    """AdamW betas and the device name."""
    betas = plain["train"]["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        yield f"train.betas={betas} must be two numbers in [0, 1), e.g. [0.9,0.95]"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(plain["device"])):
        yield f"device={plain['device']!r} is not a device; use auto, cpu, cuda or cuda:N"


def check_sampler(plain: dict) -> Iterator[str]:
    """Guidance interval, the SDE's diffusion, encoder sharing and its number of recompute steps."""
    s = plain["sampler"]
    interval = s["cfg_interval"]
    if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
        yield (f"sampler.cfg_interval={interval} must be [low,high] with 0 <= low < high <= 1 "
               f"(guidance where low < t < high), e.g. [0.3,1.0]")
    if s["solver"] == "sde" and s.get("sde_diffusion") is None:
        yield "sampler.solver=sde needs sampler.sde_diffusion; select sampler=sde, which sets it"
    if s["sharing"] != "none" and not has_encoder(plain["model"]["arch"]):
        yield (f"sampler.sharing={s['sharing']} reuses the condition encoder of a DDT; "
               f"model.arch={plain['model']['arch']} has none: use sampler.sharing=none")
    elif s["sharing"] != "none" and not (s["num_recompute"] is not None and 1 <= s["num_recompute"] <= s["num_steps"]):
        yield (f"sampler.sharing={s['sharing']} needs sampler.num_recompute between 1 and "
               f"sampler.num_steps={s['num_steps']} (got {s['num_recompute']})")


def check_curve(plain: dict, todo: list[str]) -> Iterator[str]:
    """A curve (eval.every_steps, stage=curve) needs metrics."""
    every = plain["eval"].get("every_steps", 0)
    if plain["eval"]["name"] == "none" and (every or "curve" in todo):
        yield (f"eval=none computes no metrics, so there is no curve (eval.every_steps={every}, stage={todo}); "
               f"pick eval=fid_digits or fid_imagenet")


def check_fd_dinov2(plain: dict) -> Iterator[str]:
    """FD-DINOv2 needs DINOv2 statistics of the reference, which an ADM reference batch does not have."""
    from ddt.metrics import NPZ_HAS_NO_DINOV2  # the message fd_dinov2() also raises

    ev = plain["eval"]
    if ev.get("fd_dinov2") and ev.get("reference") == "adm_npz" and plain["data"]["name"] != "digits":
        yield NPZ_HAS_NO_DINOV2


def check_data(plain: dict, todo: list[str]) -> Iterator[str]:
    """Paths and settings the data, codec and REPA groups need for the stages asked for."""
    data, res, repa = plain["data"], plain["resolution"], plain["repa"]
    latent = res.get("vae") is not None
    if latent and res["image_size"] != res["latent_size"] * 8:
        yield (f"resolution.latent_size={res['latent_size']} must be resolution.image_size/8 "
               f"={res['image_size'] / 8:g} (SD-VAE downsamples 8x)")
    if data["name"] in ("imagenet", "imagenet_latents") and not latent:
        yield (f"data={data['name']} is latent-space: use resolution=r256 or r512 "
               f"(resolution.vae is null in this resolution)")
    if data["name"] == "digits" and latent:
        yield "data=digits is pixel-space: use resolution=r16"
    needs_root = (data["name"] == "imagenet" and "train" in todo) or "cache_latents" in todo or (
        data["name"] == "imagenet_latents" and repa["enabled"] and "train" in todo) or (
        "evaluate" in todo and plain["eval"].get("reference") == "dataset" and data["name"] != "digits")
    if needs_root and not data.get("root"):
        yield (f"data.root is not set; pass data.root=/path/to/imagenet/train (an image folder "
               f"root/<class>/<image>), needed by stage={todo}, data={data['name']}, "
               f"repa.enabled={repa['enabled']}, eval.reference={plain['eval'].get('reference')}")
    if "cache_latents" in todo and data["name"] != "imagenet_latents":
        yield f"stage=cache_latents writes data=imagenet_latents' cache; data={data['name']} has none"
    if repa["enabled"] and not (repa.get("align_layer") and 1 <= repa["align_layer"] <= plain["model"]["depth"]):
        yield (f"repa.align_layer={repa.get('align_layer')} must be a block index between 1 and "
               f"model.depth={plain['model']['depth']}")


def dispersive_layer(plain: dict) -> int:
    """The block the dispersive loss reads: repa.layer, or a quarter of model.depth when it is null."""
    return plain["repa"].get("layer") or plain["model"]["depth"] // 4


def check_halving(plain: dict) -> Iterator[str]:
    """The rungs of a halving study (+halving=on): positive, increasing."""
    halving = plain.get("halving")
    if halving and (problem := rungs_problem(list(halving["rungs"]))):
        yield problem


def check_dispersive(plain: dict) -> Iterator[str]:
    """The dispersive loss (repa=dispersive): not together with REPA, its settings set, its block in the model."""
    repa, depth = plain["repa"], plain["model"]["depth"]
    if not repa.get("dispersive"):
        return
    if repa["enabled"]:
        yield ("repa.dispersive=true and repa.enabled=true cannot be combined (repa.weight weighs one "
               "regulariser): use repa=dispersive or repa=on")
    unset = [k for k in ("temperature", "weight") if repa.get(k) is None]
    if unset:
        yield (f"repa.dispersive=true needs {' and '.join(f'repa.{k}' for k in unset)}; "
               f"select repa=dispersive, which sets them")
    if not 1 <= dispersive_layer(plain) <= depth:
        layer = "null" if repa.get("layer") is None else repa["layer"]
        yield (f"repa.layer={layer} gives block {dispersive_layer(plain)} for the dispersive loss; "
               f"it must be a block index between 1 and model.depth={depth}")


def check_ckpt(plain: dict) -> Iterator[str]:
    """ckpt= names a checkpoint file that exists (the runner checks this and its contents before any work)."""
    if not plain["ckpt"]:
        return
    path = Path(plain["ckpt"]).expanduser()
    if path.is_dir():
        inside = path / "checkpoints" / "last.pt"
        hint = f"ckpt={inside}" if inside.is_file() else "ckpt=RUN_DIR/checkpoints/last.pt"
        yield f"ckpt={plain['ckpt']} is a folder, not a checkpoint file; point it at the file, e.g. {hint}"
    elif not path.exists():
        yield f"ckpt={plain['ckpt']} does not exist; check the path (suite checkpoints are RUN_DIR/checkpoints/*.pt)"


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the config groups launch.py composes


def model_file(name: str, conf_dir: str | Path | None = None) -> dict:
    """The values conf/model/NAME.yaml gives (its defaults list merged in), less those it takes from other keys."""
    raw = OmegaConf.load(Path(conf_dir or CONF_DIR) / "model" / f"{name}.yaml")
    defaults = [str(d) for d in raw.pop("defaults", [])]
    merged = OmegaConf.create({})
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:  # Hydra's order (_self_ last by default)
        merged = OmegaConf.merge(merged, raw if entry == "_self_" else model_file(entry, conf_dir))
    return {k: merged[k] for k in merged if not OmegaConf.is_interpolation(merged, k)}


def model_presets(conf_dir: str | Path | None = None) -> dict[str, str]:
    """Each size preset's name (a conf/model file's `preset`, e.g. XL) and that file's name (ddt_xl)."""
    files = sorted((Path(conf_dir or CONF_DIR) / "model").glob("*.yaml"))
    return {model_file(p.stem, conf_dir)["preset"]: p.stem for p in files}


def model_group(preset: str, *, in_channels: int = 4, num_classes: int = 1000, conf_dir: str | Path | None = None,
                **overrides) -> dict:
    """The `model` group of a size preset (name or file: XL, ddt_xl) as conf/model gives it, with `overrides`;
    in_channels and num_classes, which the resolution and data groups set, default to latent ImageNet's."""
    presets = model_presets(conf_dir)
    if preset not in presets and preset not in presets.values():
        raise KeyError(f"unknown model preset {preset!r}; choose one of {sorted(presets)} (conf/model)")
    group = {"arch": "ddt", **model_file(presets.get(preset, preset), conf_dir), "in_channels": in_channels,
             "num_classes": num_classes, **overrides}
    return {**group, "decoder_depth": decoder_depth(group["depth"], group["encoder_depth"])}


def build_ddt(preset: str, **kwargs) -> nn.Module:
    """The network of a size preset of conf/model (`model_group`'s arguments); defaults give latent ImageNet's DDT."""
    from ddt.models import model_from_config  # torch: imported only where a network is built

    return model_from_config(model_group(preset, **kwargs))


def build_network(cfg: Mapping) -> nn.Module:
    """The network of a (typed or plain) resolved config, from its `model` group."""
    from ddt.models import model_from_config  # torch: imported only where a network is built

    return model_from_config(cfg["model"], prediction=cfg["prediction"])


def sampler_kwargs(plain: dict) -> dict:
    """Arguments of ddt.sampling.sample from the resolved `sampler` group (sharing is resolved apart)."""
    s = plain["sampler"]
    kwargs = dict(solver=s["solver"], num_steps=s["num_steps"], cfg_scale=s["cfg_scale"],
                  cfg_interval=tuple(s["cfg_interval"]), timeshift=s["timeshift"], last_step=s["last_step"],
                  fresh_timestep=s["fresh_timestep"])
    if s.get("sde_diffusion") is not None:
        kwargs["sde_diffusion"] = s["sde_diffusion"]
    if s["solver"] == "adams" and s.get("order") is not None:  # the other solvers have a fixed order
        kwargs["order"] = s["order"]
    return kwargs
