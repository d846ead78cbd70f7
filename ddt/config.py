"""Checks and conversions between a composed OmegaConf config and the library's plain arguments.

The library below this module takes plain Python values; this is the one place that knows the
config's key names, so every error here names the key at fault.
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddt.sampling import SHARING, SOLVERS

STAGES = ("cache_latents", "train", "curve", "sample", "evaluate")

# Keys that say nothing about what a run computes: runs that differ only in these share a config_id.
NOT_CONFIG_ID_KEYS = ("seed", "name", "cache_dir", "progress", "device", "logger", "tags")


def _decoder_depth(depth: int, encoder_depth: int) -> int:
    if not 0 < int(encoder_depth) < int(depth):
        raise ValueError(f"model.encoder_depth={encoder_depth} is impossible for model.depth={depth}: "
                         f"it must be between 1 and {int(depth) - 1} so that the decoder keeps at least "
                         f"one block")
    return int(depth) - int(encoder_depth)


def run_subdir(override_dirname: str, max_length: int = 200) -> str:
    """A flat folder name for a run from its overrides (`default` when there are none)."""
    name = override_dirname.replace("/", "_").replace("\\", "_") or "default"
    if len(name) > max_length:  # file systems stop at 255 bytes per name
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: max_length - 11]}-{digest}"
    return name


def _required(key: str, what: str) -> None:
    """`${ddt.required:KEY,WHAT}`: a value the command line must give (OmegaConf's ??? is lost in merges)."""
    raise ValueError(f"{key} is required here: pass {key}=... ({what})")


def register_resolvers() -> None:
    """Resolvers the config files use: `ddt.decoder_depth`, `ddt.run_subdir`, `ddt.required` (idempotent)."""
    for name, fn in (("ddt.decoder_depth", _decoder_depth), ("ddt.run_subdir", run_subdir),
                     ("ddt.required", _required)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def digest(obj) -> str:
    """12 hex digits of the SHA-256 of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_id(plain: dict) -> str:
    """Hash of the resolved config without seed, run names and logging keys: the group of a run's seeds."""
    return digest({k: v for k, v in plain.items() if k not in NOT_CONFIG_ID_KEYS})


def stages(cfg: DictConfig) -> list[str]:
    """`stage` as a list in pipeline order (evaluate implies sample); a name or a list is accepted."""
    value = cfg.stage
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"stage={OmegaConf.to_yaml(value).strip()} has unknown stage(s) {unknown}; "
                         f"use any of {list(STAGES)}")
    if "evaluate" in names:
        names.append("sample")  # evaluation needs samples; images already written are kept
    return [s for s in STAGES if s in names]


def validate(cfg: DictConfig) -> dict:
    """Resolve every interpolation and check cross-group constraints; returns the plain config."""
    register_resolvers()
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    model, res = plain["model"], plain["resolution"]
    if res["latent_size"] % model["patch_size"]:
        raise ValueError(f"resolution.latent_size={res['latent_size']} is not divisible by "
                         f"model.patch_size={model['patch_size']}; pick another patch size or resolution")
    if model["hidden_size"] % model["num_heads"] or (model["hidden_size"] // model["num_heads"]) % 4:
        raise ValueError(f"model.hidden_size={model['hidden_size']} / model.num_heads={model['num_heads']} "
                         f"must give a head width that is a multiple of 4 (2-D RoPE)")
    if plain["train"]["batch_size"] < 1:
        raise ValueError(f"train.batch_size={plain['train']['batch_size']} must be positive")
    if plain["eval"].get("num_samples", 1) < 1:
        raise ValueError(f"eval.num_samples={plain['eval']['num_samples']} must be positive")
    check_curve(plain, stages(cfg))
    todo = stages(cfg)
    sampler_kwargs(plain)
    check_sharing(plain)
    check_data(plain, todo)
    return plain


def check_curve(plain: dict, todo: list[str]) -> None:
    """eval.every_steps and eval.curve_num_samples: a curve needs metrics and a positive cadence."""
    ev = plain["eval"]
    every, num = ev.get("every_steps", 0), ev.get("curve_num_samples")
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"eval.every_steps={every} must be 0 (evaluate only at the end) or a positive number "
                         f"of training steps")
    if num is not None and (not isinstance(num, int) or num < 1):
        raise ValueError(f"eval.curve_num_samples={num} must be null (= eval.num_samples) or positive")
    if ev["name"] == "none" and (every or "curve" in todo):
        raise ValueError(f"eval=none computes no metrics, so there is no curve (eval.every_steps={every}, "
                         f"stage={todo}); pick eval=fid_digits or fid_imagenet")


def check_data(plain: dict, todo: list[str]) -> None:
    """Paths and settings the data, codec and REPA groups need for the stages asked for."""
    data, res, repa = plain["data"], plain["resolution"], plain["repa"]
    latent = res.get("vae") is not None
    if latent and res["image_size"] != res["latent_size"] * 8:
        raise ValueError(f"resolution.latent_size={res['latent_size']} must be resolution.image_size/8 "
                         f"={res['image_size'] / 8:g} (SD-VAE downsamples 8x)")
    if data["name"] in ("imagenet", "imagenet_latents") and not latent:
        raise ValueError(f"data={data['name']} is latent-space: use resolution=r256 or r512 "
                         f"(resolution.vae is null in this resolution)")
    if data["name"] == "digits" and latent:
        raise ValueError("data=digits is pixel-space: use resolution=r16")
    needs_root = (data["name"] == "imagenet" and "train" in todo) or "cache_latents" in todo or (
        data["name"] == "imagenet_latents" and repa["enabled"] and "train" in todo) or (
        "evaluate" in todo and plain["eval"].get("reference") == "dataset" and data["name"] != "digits")
    if needs_root and not data.get("root"):
        raise ValueError(f"data.root is not set; pass data.root=/path/to/imagenet/train (an image folder "
                         f"root/<class>/<image>) — needed by stage={todo}, data={data['name']}, "
                         f"repa.enabled={repa['enabled']}, eval.reference={plain['eval'].get('reference')}")
    if "cache_latents" in todo and data["name"] != "imagenet_latents":
        raise ValueError(f"stage=cache_latents writes data=imagenet_latents' cache; data={data['name']} has none")
    if repa["enabled"] and not 1 <= repa["align_layer"] <= plain["model"]["depth"]:
        raise ValueError(f"repa.align_layer={repa['align_layer']} must be a block index between 1 and "
                         f"model.depth={plain['model']['depth']}")


def model_kwargs(plain: dict) -> dict:
    """DDT constructor arguments from the resolved `model` group."""
    m = plain["model"]
    return dict(arch=m["arch"], in_channels=m["in_channels"], patch_size=m["patch_size"],
                hidden_size=m["hidden_size"], num_heads=m["num_heads"], depth=m["depth"],
                encoder_depth=m["encoder_depth"] if m["arch"] == "ddt" else None, num_classes=m["num_classes"],
                norm=m["norm"], ffn=m["ffn"],
                pos=m["pos"], qk_norm=m["qk_norm"])


def sampler_kwargs(plain: dict) -> dict:
    """Arguments of ddt.sampling.sample from the resolved `sampler` group (sharing is resolved apart)."""
    s = plain["sampler"]
    if s["solver"] not in SOLVERS:
        raise ValueError(f"sampler.solver={s['solver']!r} is unknown; use sampler=euler, heun or sde")
    kwargs = dict(solver=s["solver"], num_steps=s["num_steps"], cfg_scale=s["cfg_scale"],
                  cfg_interval=tuple(s["cfg_interval"]), timeshift=s["timeshift"], last_step=s["last_step"],
                  fresh_timestep=s["fresh_timestep"])
    if "sde_diffusion" in s:
        kwargs["sde_diffusion"] = s["sde_diffusion"]
    return kwargs


def check_sharing(plain: dict) -> None:
    """sampler.sharing and sampler.num_recompute must fit sampler.num_steps."""
    s = plain["sampler"]
    if s["sharing"] not in SHARING:
        raise ValueError(f"sampler.sharing={s['sharing']!r} is unknown; use one of {list(SHARING)}")
    if s["sharing"] != "none" and plain["model"]["arch"] != "ddt":
        raise ValueError(f"sampler.sharing={s['sharing']} reuses the condition encoder of a DDT; "
                         f"model.arch={plain['model']['arch']} has none: use sampler.sharing=none")
    if s["sharing"] != "none" and not (isinstance(s["num_recompute"], int) and 1 <= s["num_recompute"] <= s["num_steps"]):
        raise ValueError(f"sampler.sharing={s['sharing']} needs sampler.num_recompute between 1 and "
                         f"sampler.num_steps={s['num_steps']} (got {s['num_recompute']})")
