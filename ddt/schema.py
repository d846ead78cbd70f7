"""The config schema: every key's type, allowed values, range and meaning, written once.

The YAML files in conf/ stay the user interface; these dataclasses (one per config group, plus the
top-level keys) say what each key may hold. `check_types` walks a composed config against them and
returns every problem at once, one line each, naming the key, the value, what is allowed and the
closest valid key for a typo; cross-key rules live in ddt.config. We check ourselves rather than
merging into `OmegaConf.structured` because OmegaConf stops at the first error and cannot express
ranges. `python -m ddt.schema` prints the configuration reference (docs/configuration.md is that
output; a test keeps the two equal).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddt.tracking import HIGHER_IS_BETTER

MISSING = dataclasses.MISSING
HalvingMetric = Literal[tuple(HIGHER_IS_BETTER)]  # the metrics whose direction is known


def key(help: str, default: Any = MISSING, later: bool = False, **limits: float) -> Any:
    """A schema field: its help text, default (none: required), limits (ge, gt, le, lt) and whether it came `later`.

    A `later` key was added after runs were recorded; its default computes what its absence computed, so at
    that value it is left out of comparisons (ddt.config.comparable): it neither redoes completed runs, nor
    sets their curve points aside, nor changes their config_id.
    """
    kwargs = {"metadata": {"help": help, "later": later, **limits}}
    if isinstance(default, list):
        kwargs["default_factory"] = lambda: list(default)
    elif default is not MISSING:
        kwargs["default"] = default
    return field(**kwargs)


class Group(Mapping):
    """A config group as the code receives it: typed attributes (`cfg.model.depth`), a key the YAML left out
    reading as its schema default.

    Read as a mapping (`cfg["model"]["depth"]`, iteration, `to_dict`), a group holds the keys the composed config
    gave, as before the typed config: that is what results.json records and config_id hashes, so neither changes
    for existing runs.
    """

    def _keys(self) -> tuple[str, ...]:
        given = self.__dict__.get("_given")  # set by from_plain; a group built in code holds every field
        return self._names() if given is None else given

    def __getitem__(self, name: str) -> Any:
        if name not in self._keys():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """The plain resolved config (a deep copy), as results.json records it and config_id hashes it."""
        return {k: v.to_dict() if isinstance(v, Group) else copy.deepcopy(v) for k, v in self.items()}

    @classmethod
    def from_plain(cls, plain: Mapping) -> "Group":
        """The typed group of a resolved config that check_types passed (keys it does not know are left out)."""
        groups = {**GROUPS, **OPTIONAL_GROUPS} if cls is RootSchema else {}
        group = cls(**{f.name: groups[f.name].from_plain(plain[f.name]) if f.name in groups and plain[f.name] is not None
                       else plain[f.name] for f in dataclasses.fields(cls) if f.name in plain})
        group._given = tuple(name for name in cls._names() if name in plain)
        return group


@dataclass(eq=False)  # compared as mappings (Group), also with plain dicts
class ModelSchema(Group):
    """The network (`model` group; `baseline` sets the block options)."""

    preset: str = key("name of the size preset (S, B, L, XL, quickstart; S-DH to XL-DH: with RAE's wide decoder head)")
    depth: int = key("total number of transformer blocks", ge=1)
    hidden_size: int = key("width of every block", ge=1)
    num_heads: int = key("attention heads; hidden_size / num_heads must be a multiple of 4 (2-D RoPE)", ge=1)
    encoder_depth: int = key("blocks of the condition encoder; the rest form the velocity decoder", ge=1)
    decoder_depth: int = key("derived: depth - encoder_depth (do not set; experiments/head_width.yaml sets it "
                             "and derives depth instead)")
    patch_size: int = key("patch size of both patch embedders", ge=1)
    in_channels: int = key("image or latent channels (from resolution.channels)", ge=1)
    num_classes: int = key("class labels (from data.num_classes); one more row is the null class", ge=1)
    repa_align_layer: int = key("the block REPA aligns for this size when repa=on (4 for S/B, 8 for L/XL)", ge=1)
    decoder_hidden_size: Optional[int] = key("width of the decoder blocks, their patch embedder and the final layer "
                                             "(RAE's wide DDT head); null = hidden_size", None, later=True, ge=1)
    decoder_num_heads: Optional[int] = key("attention heads of the decoder blocks; null = num_heads", None, later=True,
                                           ge=1)
    arch: Literal["ddt", "sit"] = key("ddt (decoupled) or sit (Improved-SiT: one stack, no self-condition)", "ddt")
    norm: Literal["rmsnorm", "layernorm"] = key("block normalisation", "rmsnorm")
    ffn: Literal["swiglu", "mlp"] = key("feed-forward: SwiGLU (2/3*4*D, no biases) or DiT's GELU MLP", "swiglu")
    pos: Literal["rope", "sincos"] = key("position encoding: 2-D RoPE or DiT's fixed sin-cos", "rope")
    qk_norm: bool = key("RMSNorm on queries and keys", True)


@dataclass(eq=False)
class ResolutionSchema(Group):
    """Image and latent size, and the codec between them (`resolution` group)."""

    image_size: int = key("image side in pixels", ge=1)
    latent_size: int = key("side of what the network sees (image_size / 8 through the SD-VAE)", ge=1)
    channels: int = key("channels of what the network sees (3 pixels, 4 SD-VAE latents)", ge=1)
    vae: Optional[str] = key("SD-VAE hub name or local save_pretrained folder; null = pixel space", None)
    adm_reference: Optional[str] = key("file name of the ADM reference batch in cache_dir", None)


@dataclass(eq=False)
class DataSchema(Group):
    """The training data (`data` group)."""

    name: Literal["digits", "imagenet", "imagenet_latents"] = key("which dataset")
    num_classes: int = key("number of classes", ge=1)
    num_workers: int = key("DataLoader processes", 0, ge=0)
    root: Optional[str] = key("image folder root/<class>/<image> (ImageNet train)", None)
    latents_dir: Optional[str] = key("SD-VAE latent cache folder (data=imagenet_latents)", None)
    shard_size: int = key("images per latent-cache shard", 1000, ge=1)
    cache_batch_size: int = key("images per VAE forward while caching", 64, ge=1)
    cache_dtype: Literal["float32", "float16", "bfloat16"] = key("dtype of the cached latents", "float32")
    cache_rank: Optional[int] = key("this task's share of the shards; null = SLURM array task / rank", None, ge=0)
    cache_world_size: Optional[int] = key("tasks sharing the cache work; null = SLURM array size / world size",
                                          None, ge=1)


@dataclass(eq=False)
class TrainSchema(Group):
    """The optimisation (`train` group)."""

    max_steps: int = key("training steps (0: the untrained model)", ge=0)
    batch_size: int = key("global batch, split across ranks", ge=1)
    lr: float = key("AdamW learning rate, constant", gt=0)
    betas: list[float] = key("AdamW betas, each in [0, 1)", [0.9, 0.95])
    weight_decay: float = key("AdamW weight decay", 0.0, ge=0)
    ema_decay: float = key("EMA decay per step", 0.9999, gt=0, lt=1)
    time_distribution: Literal["lognorm", "uniform"] = key("training time sampling", "lognorm")
    label_dropout: float = key("probability of the null label (classifier-free guidance)", 0.1, ge=0, lt=1)
    ckpt_every: int = key("checkpoints/last.pt cadence in steps", 10_000, ge=1)
    keep_every: int = key("also keep checkpoints/step_N.pt on this cadence (0 = never)", 0, ge=0)
    log_every: int = key("log cadence in steps", 100, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = key(
        "auto = bf16 autocast on GPU, and on a CPU with bf16 units (AVX512-BF16, AMX) when model.hidden_size >= 128; "
        "fp32 otherwise", "auto")
    compile: bool = key("torch.compile the model the suite's way (ddt.models.compile_model: every block)", False)
    activation_checkpointing: bool = key("recompute block activations in backward (memory for time)", False)


@dataclass(eq=False)
class SamplerSchema(Group):
    """The ODE/SDE sampler and encoder sharing (`sampler` group)."""

    solver: Literal["euler", "heun", "sde", "adams"] = key("solver")
    num_steps: int = key("sampling steps", ge=1)
    cfg_scale: float = key("classifier-free guidance scale (1.0 = none)", 1.0, ge=0)
    cfg_interval: list[float] = key("guidance only where cfg_interval[0] < t < cfg_interval[1]", [0.0, 1.0])
    timeshift: float = key("t -> t / (t + (1 - t) * timeshift)", 1.0, gt=0)
    last_step: Optional[float] = key("size of the final step; null = 1 / num_steps", None, gt=0, lt=1)
    batch_size: int = key("images per sampling batch per rank", 250, ge=1)
    compile: bool = key("torch.compile the model for sampling (ddt.models.compile_model)", False)
    sharing: Literal["none", "uniform", "dp"] = key("encoder sharing schedule", "none")
    num_recompute: Optional[int] = key("K encoder passes of num_steps; required by uniform and dp", None, ge=1)
    fresh_timestep: bool = key("reused encoder state combined with the current step's timestep", False)
    dp_template_size: int = key("images sampled without sharing to measure step similarities (dp)", 8, ge=1)
    sde_diffusion: Optional[float] = key("SDE diffusion w: w(t) = sde_diffusion * (1 - t) (solver=sde)", None, ge=0)
    order: Optional[int] = key("Adams-Bashforth order (solver=adams; null = 2; other solvers ignore it)", None,
                               later=True, ge=1, le=4)


@dataclass(eq=False)
class EvalSchema(Group):
    """Sample counts and metrics (`eval` group)."""

    name: Literal["fid_digits", "fid_imagenet", "none"] = key("which evaluation")
    num_samples: int = key("images the sample stage writes and the final point scores", ge=1)
    feature_extractor: Optional[Literal["digits-classifier", "inception-v3-compat"]] = key(
        "torch-fidelity feature extractor", None)
    digits_classifier: Optional[str] = key("shipped digits classifier version (ddt/assets)", None)
    inception_weights: Optional[str] = key("local Inception-v3 .pth; null = cache_dir, downloaded if missing", None)
    fd_dinov2: bool = key("also FD-DINOv2 (metrics.fd_dinov2): Frechet distance of DINOv2 CLS features, against "
                          "the reference images (ImageNet: needs reference=dataset)", False, later=True)
    dinov2_model: Literal["dinov2-vit-s-14", "dinov2-vit-b-14", "dinov2-vit-l-14", "dinov2-vit-g-14"] = key(
        "torch-fidelity DINOv2 extractor of fd_dinov2 (EDM2 and RAE report ViT-L/14)", "dinov2-vit-l-14", later=True)
    dinov2_weights: Optional[str] = key("local official dinov2_*_pretrain.pth of dinov2_model; null = cache_dir, "
                                        "downloaded if missing", None, later=True)
    reference: Optional[Literal["dataset", "adm_npz"]] = key("statistics of the data's images or the ADM npz", None)
    reference_npz: Optional[str] = key("ADM reference batch; null = cache_dir/resolution.adm_reference", None)
    prc: bool = key("precision and recall", False)
    kid: bool = key("kernel inception distance (unbiased)", False)
    isc_protocol: Literal["adm", "torch_fidelity"] = key(
        "Inception Score splits: adm = consecutive 5000-sample splits (the ADM evaluator, the papers' IS), "
        "torch_fidelity = 10 shuffled splits", "adm")
    feature_batch_size: int = key("images per feature-extraction batch", 250, ge=1)
    every_steps: int = key("curve points every N training steps (0 = only at the end)", 0, ge=0)
    curve_num_samples: Optional[int] = key("samples per intermediate curve point; null = num_samples", None, ge=1)


@dataclass(eq=False)
class RepaSchema(Group):
    """Representation regulariser (`repa` group): `off`, REPA (`on`, DINOv2) or the dispersive loss (`dispersive`)."""

    enabled: bool = key("REPA on or off")
    target_encoder: Optional[str] = key("timm name of the frozen target encoder", None)
    target_weights: Optional[str] = key("local model.safetensors; null = Hugging Face hub", None)
    target_kwargs: Optional[dict] = key("extra timm.create_model arguments", None)
    align_layer: Optional[int] = key("1-based block whose output is aligned", None, ge=1)
    projector_dim: Optional[int] = key("hidden width of the 3-layer projector (repa=on: model.hidden_size, as the "
                                       "official DDT configs; REPA's SiT used 2048); null = model.hidden_size",
                                       None, ge=1)
    weight: Optional[float] = key("weight of the regulariser's loss (REPA's 1 - cos, or the dispersive loss)",
                                  None, ge=0)
    dispersive: bool = key("dispersive loss on the model's own hidden states (repa=dispersive; not with enabled)",
                           False)
    temperature: Optional[float] = key("dispersive loss temperature tau", None, gt=0)
    layer: Optional[int] = key("1-based block whose output the dispersive loss reads; null = model.depth // 4",
                               None, ge=1)


@dataclass(eq=False)
class LoggerSchema(Group):
    """Experiment tracking (`logger` group)."""

    backend: Literal["none", "wandb"] = key("tracker")
    project: Optional[str] = key("W&B project", None)
    entity: Optional[str] = key("W&B team or user; null = the API key's default", None)
    mode: Optional[Literal["online", "offline", "disabled"]] = key("W&B mode", None)
    group: Optional[str] = key("W&B group; null = the study <name>-<time>", None)
    tags: list[str] = key("W&B tags (the experiment's)", [])
    sample_every: int = key("EMA sample grid cadence in steps (0 = never)", 0, ge=0)
    grid_size: int = key("images in the EMA sample grid", 16, ge=1)


@dataclass(eq=False)
class HalvingSchema(Group):
    """Successive halving over the sweep's points (`+halving=on`, docs/halving.md): an optional group."""

    rungs: list[int] = key("training steps of the rungs, increasing; the last is the full length")
    eta: int = key("keep the best ceil(n/eta) of the n configurations at a rung (and any whose 95% interval "
                   "overlaps the best's)", 3, ge=2)
    metric: HalvingMetric = key("curve metric the rungs rank by (its direction: ddt.tracking.HIGHER_IS_BETTER)",
                                "fid")


@dataclass(eq=False)
class RootSchema(Group):
    """Top-level keys and the groups."""

    model: ModelSchema
    resolution: ResolutionSchema
    data: DataSchema
    train: TrainSchema
    sampler: SamplerSchema
    eval: EvalSchema
    repa: RepaSchema
    logger: LoggerSchema
    name: str = key("run folders: runs/<name>/<overrides>/")
    stage: list[Literal["cache_latents", "train", "curve", "sample", "evaluate"]] = key(
        "stages to run: a name or a list (evaluate implies sample)",
                           ["train", "sample", "evaluate"])
    ckpt: Optional[str] = key("checkpoint to start training from or to sample/evaluate", None)
    ckpt_ema: bool = key("use the checkpoint's EMA weights (false: the raw training weights)", True)
    seed: int = key("model init, data order and sampling noise", 0, ge=0)
    prediction: Literal["v", "x", "eps"] = key(
        "what the network's output is read as: v = velocity (the official DDT), x = clean image (JiT), eps = noise; "
        "converted to a velocity (ddt.models.ddt.PREDICTIONS), so the loss stays in velocity space", "v", later=True)
    device: str = key("auto (cuda if available), cpu, cuda or cuda:N", "auto")
    cache_dir: str = key("reference statistics, Inception weights, latent cache", ".cache/ddt")
    progress: bool = key("progress bars (log lines when stderr is not a terminal)", True)
    tags: list[str] = key("labels of the study", [])
    paper: Optional[dict] = key("published numbers of an experiment (recorded, not used)", None)
    halving: Optional[HalvingSchema] = key("a successive-halving study (+halving=on); null: none", None)


GROUPS = {name: tp for name, tp in typing.get_type_hints(RootSchema).items() if dataclasses.is_dataclass(tp)}
# Groups a config has only when the command line adds them (+halving=on); absent, they are not in to_dict,
# so no existing run's config (results.json) or config_id changes.
OPTIONAL_GROUPS = {"halving": HalvingSchema}


def later_keys() -> dict[str, Any]:
    """The dotted keys marked `later`, each with the default that computes what its absence computed."""
    return {f"{prefix}.{f.name}" if prefix else f.name: f.default
            for prefix, schema in [("", RootSchema), *GROUPS.items()]
            for f in dataclasses.fields(schema) if f.metadata.get("later")}


#################################################################################
#     The model's rules: the config's checks and the network both use these     #
#################################################################################

ENCODER_ARCHS = ("ddt",)  # the archs with a condition encoder (blocks[:encoder_depth]); sit has none


def has_encoder(arch: str) -> bool:
    """Whether `model.arch` has a condition encoder whose output s the decoder reads (ddt: yes, sit: no)."""
    return arch in ENCODER_ARCHS


def decoder_depth(depth: int, encoder_depth: int) -> int:
    """The decoder's blocks, depth - encoder_depth (conf/model's `${ddt.decoder_depth:...}`, `DDT.decoder_depth`)."""
    return int(depth) - int(encoder_depth)


def split_problem(depth: int, encoder_depth: int) -> str | None:
    """The line naming an impossible depth split (the decoder keeps at least one block), or None."""
    if 0 < encoder_depth < depth:
        return None
    return (f"model.encoder_depth={encoder_depth} is impossible for model.depth={depth}: "
            f"it must be between 1 and {depth - 1} so that the decoder keeps at least one block")


def rungs_problem(rungs: list[int]) -> str | None:
    """The line naming halving.rungs that are not increasing positive steps, or None."""
    if rungs and rungs[0] > 0 and all(a < b for a, b in zip(rungs, rungs[1:])):
        return None
    return (f"halving.rungs=[{','.join(map(str, rungs))}] must be training steps, positive and increasing, the last "
            f"the full length, e.g. halving.rungs=[20000,100000,400000]")


def head_problems(arch: str, decoder_hidden_size: int | None, decoder_num_heads: int | None) -> list[str]:
    """One line per decoder-head key set on an arch without a condition encoder (it has no decoder to size)."""
    if has_encoder(arch):
        return []
    return [f"model.{k}={v} sizes a DDT's decoder; model.arch={arch} has none: set model.{k}=null"
            for k, v in (("decoder_hidden_size", decoder_hidden_size), ("decoder_num_heads", decoder_num_heads))
            if v is not None]


#################################################################################
#                                Type checks                                    #
#################################################################################

def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _describe(tp: Any) -> str:
    """A type as the user writes it: `int`, `one of a, b`, `a list of float`, `... or null`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, str(tp))


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _limits(name: str, value: Any, meta: dict) -> str | None:
    """The range a number breaks, as `must be > 0`, or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    bounds = {"ge": (">=", lambda a, b: a >= b), "gt": (">", lambda a, b: a > b),
              "le": ("<=", lambda a, b: a <= b), "lt": ("<", lambda a, b: a < b)}
    broken = [f"{sign} {meta[k]:g}" for k, (sign, ok) in bounds.items() if k in meta and not ok(value, meta[k])]
    if not broken:
        return None
    allowed = " and ".join(f"{sign} {meta[k]:g}" for k, (sign, _) in bounds.items() if k in meta)
    return f"{name}={value} is out of range: it must be {allowed} ({meta['help']})"


def closest(name: str, candidates: list[str]) -> str:
    """`; did you mean X?` for the nearest candidate, or nothing."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def all_keys() -> list[str]:
    """Every dotted key the schema knows."""
    out = []
    for f in dataclasses.fields(RootSchema):
        if f.name in GROUPS or f.name in OPTIONAL_GROUPS:
            groups = {**GROUPS, **OPTIONAL_GROUPS}
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(groups[f.name])]
        else:
            out.append(f.name)
    return out


def _value(cfg: DictConfig, dotted: str) -> tuple[Any, str | None]:
    """The resolved value of one key, or the reason it cannot be resolved."""
    try:
        node = OmegaConf.select(cfg, dotted, throw_on_resolution_failure=True, throw_on_missing=True)
    except Exception as err:  # an interpolation that fails (e.g. a derived key of a bad value)
        return None, f"{dotted} cannot be resolved: {str(err).splitlines()[0]}"
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True), None
    return node, None


def _check_schema(cfg: DictConfig, prefix: str, schema: type, problems: list[str], failed: set[str]) -> None:
    hints = _hints(schema)
    node = OmegaConf.select(cfg, prefix) if prefix else cfg
    known = {f.name for f in dataclasses.fields(schema)}
    present = set(node.keys()) if isinstance(node, DictConfig) else set()
    for unknown in sorted(present - known - ({"hydra"} if not prefix else set())):
        full = f"{prefix}.{unknown}" if prefix else unknown
        problems.append(f"{full} is not a config key{closest(full, all_keys())} "
                        f"(the keys are listed in docs/configuration.md)")
        failed.add(full)
    for f in dataclasses.fields(schema):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in (*GROUPS, *OPTIONAL_GROUPS) and not prefix:
            continue
        if f.name not in present:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{full} is missing: the {prefix or 'top-level'} config must set it ({f.metadata['help']})")
                failed.add(full)
            continue
        value, error = _value(cfg, full)
        if error:
            if not any(error.startswith(k) or k in error for k in failed):
                problems.append(error)
            failed.add(full)
            continue
        tp = hints[f.name]
        if full == "stage" and isinstance(value, str):
            value = [value]
        if not _fits(value, tp):
            problems.append(f"{full}={_show(value)} is not {_describe(tp)} ({f.metadata['help']})")
            failed.add(full)
            continue
        broken = _limits(full, value, f.metadata)
        if broken:
            problems.append(broken)
            failed.add(full)


def _show(value: Any, quote: bool = True) -> str:
    """A value as it is written on the command line (strings quoted in messages)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v, quote=False) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if quote and isinstance(value, str) else str(value)


def check_types(cfg: DictConfig) -> tuple[list[str], set[str]]:
    """Every unknown key, missing key, wrong type, choice and range in a composed config; and the keys at fault."""
    problems: list[str] = []
    failed: set[str] = set()
    # Keys the user sets are checked before the derived ones, so `encoder_depth=abc` is named as such.
    _check_schema(cfg, "", RootSchema, problems, failed)
    for group, schema in GROUPS.items():
        if OmegaConf.select(cfg, group) is None:
            problems.append(f"the {group} group is missing from the config")
            continue
        _check_schema(cfg, group, schema, problems, failed)
    for group, schema in OPTIONAL_GROUPS.items():
        if OmegaConf.select(cfg, group) is not None:
            _check_schema(cfg, group, schema, problems, failed)
    derived_failures = [p for p in problems if "cannot be resolved" in p]
    if len(derived_failures) < len(problems):  # a derived key fails because of a bad input named already
        problems = [p for p in problems if "cannot be resolved" not in p]
    return problems, failed


#################################################################################
#                               The reference                                   #
#################################################################################

def reference_markdown(conf_dir: str | Path | None = None) -> str:
    """The configuration reference: one table per group (with its options in conf_dir), from the schema."""
    lines = ["# Configuration reference", "",
             "Generated by `python -m ddt.schema` from `ddt/schema.py` (a test keeps this page equal to its output).",
             "Every key can be overridden on the command line (`python launch.py train.lr=3e-4`); `conf/` holds the",
             "YAML files that give the values. A key left out of a YAML file takes the default below; a key marked",
             "*required* must be set by the group's YAML file. Besides these groups, `baseline` (the paper's Table 2",
             "rows: it sets `model.arch/norm/ffn/pos/qk_norm`, `train.time_distribution` and REPA), `+experiment`",
             "(one study per file in `experiments/`) and `+cluster` (SLURM settings in `conf/cluster/`) compose",
             "the keys below.", ""]
    for title, prefix, schema in [("Top-level keys", "", RootSchema), *((f"`{g}`", g, s) for g, s in GROUPS.items()),
                                  *((f"`{g}` (optional: `+{g}=on`)", g, s) for g, s in OPTIONAL_GROUPS.items())]:
        lines += [f"## {title}", "", (schema.__doc__ or "").strip(), ""]
        options = sorted(p.stem for p in (Path(conf_dir) / prefix).glob("*.yaml")) if conf_dir and prefix else []
        if options:
            lines += [f"Options: {', '.join(f'`{prefix}={o}`' for o in options)}.", ""]
        lines += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        hints = _hints(schema)
        for f in dataclasses.fields(schema):
            if f.name in (*GROUPS, *OPTIONAL_GROUPS) and not prefix:
                continue
            default = "*required*" if f.default is MISSING and f.default_factory is MISSING else "`" + _show(
                f.default_factory() if f.default is MISSING else f.default, quote=False) + "`"
            meta = f.metadata
            rng = ", ".join(f"{s} {meta[k]:g}" for k, s in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                            if k in meta)
            name = f"{prefix}.{f.name}" if prefix else f.name
            kind = _describe(hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {default.replace('|', chr(92) + '|')} | {rng} | {meta['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown(Path(__file__).resolve().parents[1] / "conf"))
