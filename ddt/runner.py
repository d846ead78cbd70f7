"""One run: the stages (cache_latents ->) train -> sample -> evaluate wired from a composed config.

`launch.py` hands the Hydra config and the run directory to `run`; everything else (resume, what
weights to sample from, where results go) is decided here. Every stage can be skipped with
`stage=...`; re-running the same command on the same directory resumes an unfinished run and
skips a completed one. That is also how SLURM requeues work: the requeued job runs the same
command in the same (deterministic) directory. Under torch.distributed every rank runs `run`;
rank 0 alone writes results.json, checkpoints and W&B.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ddt import checkpoint
from ddt.components import Parts, prepare
from ddt.config import build_network, comparable, config_id, sampler_kwargs, stages, validate
from ddt.curve import curve_cost, kept_steps, point_settings, record_point, set_aside_stale_points
from ddt.ledger import STAGE_STATE, Ledger, Results, device_hours, read_json
from ddt.lock import Hold
from ddt.schema import RootSchema
from ddt.signals import checkpoint_on_preemption, stop_after_step_on_interrupt
from ddt.threads import size_threads
from ddt.errors import Interrupted, UsageError
from ddt.data.latents import cache_latents
from ddt.images import to_uint8
from ddt import distributed
from ddt.distributed import barrier, cache_rank, process_rank
from ddt.metrics import calculate_metrics, fd_dinov2
from ddt.samples import (RunSamples, generate_samples, image_grid, read_samples, sample_labels, sample_noise,
                         write_grid, write_npz)
from ddt.models import DDT, compile_model
from ddt.sampling import sample, schedule_cost, statistical_schedule, uniform_recompute_steps
from ddt.tracking import make_tracker, summary_row
from ddt.train import Trainer, TrainConfig
from ddt.weights import (ckpt_path, load_projector, load_weights, projector_problems, resume_checkpoint,
                         weights_problems)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; anything else is passed to torch.device and must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"device={name} but this machine has no CUDA GPU (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise UsageError(f"device={name} but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); "
                             f"pick one of those or device=auto")
    return device


def versions() -> dict:
    """Versions of Python, the key packages and the code (git commit) that produced a result."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "hydra-core", "omegaconf", "torch-fidelity", "timm", "diffusers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def recompute_schedule(model: DDT, plain: dict, cache_path: Path, weights: dict,
                       latent_shape: tuple[int, ...]) -> dict:
    """The encoder recompute steps of `sampler.sharing`; a dp schedule is computed once and cached."""
    s = plain["sampler"]
    n, sharing = s["num_steps"], s["sharing"]
    if sharing == "none":
        return {"sharing": sharing, "recompute_steps": list(range(n)), "num_recompute": n, "sharing_ratio": 0.0}
    if sharing == "uniform":
        steps = uniform_recompute_steps(n, s["num_recompute"])
        info = {}
    else:
        key = {**weights, "sampler": dict(s)}  # JSON: the typed group as its plain keys
        cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        if cached.get("key") == key:
            steps, info = cached["recompute_steps"], cached["info"]
            log.info("dp schedule from %s", cache_path)
        else:
            start = time.perf_counter()
            size = s["dp_template_size"]
            device = next(model.parameters()).device
            noise = sample_noise(torch.arange(size), latent_shape, plain["seed"] + 1).to(device)
            labels = sample_labels(size, model.num_classes).to(device)
            kwargs = {**sampler_kwargs(plain), "generator": torch.Generator(device).manual_seed(plain["seed"])}
            steps, similarity = statistical_schedule(model.eval(), noise, labels, s["num_recompute"], **kwargs)
            info = {"dp_template_size": size, "dp_seconds": round(time.perf_counter() - start, 3),
                    "dp_cost": schedule_cost(similarity, steps),
                    "uniform_cost": schedule_cost(similarity, uniform_recompute_steps(n, s["num_recompute"]))}
            checkpoint.atomic_write_json({"key": key, "recompute_steps": steps, "info": info,
                                          "similarity": [[round(v, 5) for v in row] for row in similarity.tolist()]},
                                         cache_path)
    log.info("encoder recompute steps (%s, %d of %d): %s", sharing, len(steps), n, steps)
    return {"sharing": sharing, "recompute_steps": steps, "num_recompute": len(steps),
            "sharing_ratio": round(1 - len(steps) / n, 4), **info}


def prepare_samples_dir(samples_dir: Path, meta: dict) -> None:
    """Keep samples made with the same weights and settings; move any others aside (never delete)."""
    meta_path = samples_dir / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        stale = samples_dir.with_name(f"samples.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(samples_dir), stale)
        log.warning("samples in %s came from other weights or settings; moved them to %s", samples_dir, stale)
    samples_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(meta, meta_path)


# Keys that do not change what a run computes: a completed run is not redone when only these differ.
NOT_RESULT_KEYS = ("progress", "device", "logger")


def is_completed(results: dict, plain: dict, todo: list[str]) -> bool:
    """Whether results.json records this very run (same config and stages) as completed.

    stage=curve is never complete: each call looks for kept checkpoints that have no point yet.
    """
    saved, plain = comparable(results.get("config") or {}), comparable(plain)
    return (results.get("status") == "completed" and results.get("stages") == todo and "curve" not in todo
            and {k: v for k, v in saved.items() if k not in NOT_RESULT_KEYS}
            == {k: v for k, v in plain.items() if k not in NOT_RESULT_KEYS})


@dataclass
class Checked:
    """A run checked before any work: its typed config, stages, and the parts they need (None if completed)."""

    run_cfg: RootSchema
    plain: dict
    todo: list[str]
    parts: Parts | None
    completed: dict | None = None  # results.json of this very run, already completed


def check_run(cfg: DictConfig, run_dir: str | Path, prepare_parts: bool = True, here: bool = True) -> Checked:
    """Every setting and file the run in run_dir needs, checked before any work (all problems in one UsageError).

    prepare_parts=False leaves out what `prepare` loads (data, VAE, extractors): a sweep checks those once
    for each distinct set of the groups they come from. here=False (a job that runs on another machine, e.g.
    a SLURM node): `device` is the node's to check, not this machine's."""
    run_dir = Path(run_dir)
    run_cfg, todo = validate(cfg), stages(cfg)
    plain = run_cfg.to_dict()  # what results.json records and the stages below still read by key
    done = read_json(run_dir / "results.json")
    if is_completed(done, plain, todo):
        return Checked(run_cfg, plain, todo, None, completed=done)
    problems = []
    try:
        if here:
            resolve_device(str(plain["device"]))
    except UsageError as err:
        problems += err.problems
    problems += weights_problems(plain, todo, run_dir)
    parts = None
    try:
        parts = prepare(plain, todo) if prepare_parts else None
        if parts is not None and not problems:  # the checkpoints fit the model: does their projector fit too?
            problems += projector_problems(plain, todo, run_dir, parts.objective)
    except UsageError as err:
        problems += err.problems
    if problems:
        raise UsageError(problems)
    return Checked(run_cfg, plain, todo, parts)


# Runs launch.py checked before Hydra wrote a file: run_dir -> (the config's YAML, the check), used once.
CHECKED: dict[Path, tuple[str, Checked]] = {}


def run(cfg: DictConfig, run_dir: str | Path, sweep_dir: str | Path | None = None) -> dict:
    """Run the configured stages in run_dir (one point of sweep_dir); returns results.json's contents."""
    run_dir = Path(run_dir)
    rank = process_rank()[0]
    hold = Hold(run_dir).take() if rank == 0 else None  # before any write: a live owner stops this here
    try:
        checked = _checked(cfg, run_dir, writer=rank == 0)
        device = distributed.setup(resolve_device(checked.plain["device"]))
        try:
            results = _run(checked, run_dir, sweep_dir, device)
            barrier()  # gloo aborts a rank whose peer leaves the group while it still talks to it
            return results
        finally:
            distributed.teardown()
    finally:
        if hold is not None:
            hold.give_up()


def _checked(cfg: DictConfig, run_dir: Path, writer: bool) -> Checked:
    """launch.py's check of this run (same config), else a fresh one; a refusal in a job is recorded in its folder."""
    yaml, checked = CHECKED.pop(run_dir.resolve(), (None, None))
    if checked is not None and yaml == OmegaConf.to_yaml(cfg):
        return checked
    try:
        return check_run(cfg, run_dir)
    except UsageError as err:  # a job that owns its folder records why it stopped, for ddt.status
        Results(run_dir / "results.json", writer=writer).update(status="failed", error=str(err))
        Ledger(run_dir, writer=writer).enter("failed", error=str(err))
        raise


def _run(checked: Checked, run_dir: Path, sweep_dir: str | Path | None, device: torch.device) -> dict:
    rank = process_rank()[0]
    results, ledger = Results(run_dir / "results.json", writer=rank == 0), Ledger(run_dir, writer=rank == 0)
    run_cfg, plain, todo, parts = checked.run_cfg, checked.plain, checked.todo, checked.parts
    if checked.completed is not None:
        log.info("%s is already completed (delete its results.json to run it again): %s", run_dir,
                 summary_line(results.data))
        return results.data
    size_threads()
    torch.manual_seed(plain["seed"])
    model = build_network(run_cfg).to(device)
    results.update(status="running", error=None, stages=todo, run_dir=str(run_dir), config=plain,
                   config_id=config_id(plain),
                   versions=versions(), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                   world_size=process_rank()[1], device=device_info(device),
                   model={**model.config, "decoder_depth": getattr(model, "decoder_depth", None),
                          "parameters": sum(p.numel() for p in model.parameters())})
    logger = plain["logger"] if rank == 0 else {"backend": "none"}  # one W&B run per job
    tracker = make_tracker(logger, config={**plain, "config_id": results.data["config_id"]}, run_dir=run_dir,
                           sweep_dir=sweep_dir or run_dir.parent,
                           job_type="+".join(todo))
    try:
        _run_stages(plain, todo, parts, model, device, run_dir, results, ledger, tracker)
    except SystemExit:  # submitit requeued the job after a preemption signal; the requeued job resumes
        results.update(status="requeued")
        ledger.enter("requeued")
        tracker.finish()
        raise
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was saved stays; the same command resumes
        interrupted = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
        results.update(status="interrupted", error=None, interrupted=str(interrupted))
        ledger.enter("interrupted", reason=str(interrupted))
        tracker.summary({"status": "interrupted"})
        tracker.finish()
        saved = run_dir / "checkpoints" / "last.pt"
        log.warning("interrupted (%s); %s run the same command again to resume", interrupted,
                    f"{saved} is saved:" if saved.exists() else "nothing to keep yet:")
        raise interrupted from None
    except BaseException as err:
        results.update(status="failed", error=f"{type(err).__name__}: {err}")
        ledger.enter("failed", error=results.data["error"])
        tracker.summary({"status": "failed", "error": results.data["error"]})
        tracker.finish()
        raise
    results.update(status="completed", error=None)
    ledger.enter("completed")
    tracker.summary(summary_row(results.data))
    tracker.finish()
    log.info("%s", summary_line(results.data))
    return results.data


def summary_line(results: dict) -> str:
    """One line with the run's headline numbers and where its files are."""
    parts = [f"run {results['run_dir']}"]
    if "train" in results:
        parts.append(f"step {results['train']['step']}")
    metrics = results.get("metrics")
    if metrics:
        parts.append(f"FID {metrics['fid']:.2f}  IS {metrics['isc_mean']:.2f}")
        if "sfid" in metrics:
            parts.append(f"sFID {metrics['sfid']:.2f}")
        if "fd_dinov2" in metrics:
            parts.append(f"FD-DINOv2 {metrics['fd_dinov2']:.2f}")
        if "precision" in metrics:
            parts.append(f"precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}")
    return " | ".join(parts)


def _run_stages(plain: dict, todo: list[str], parts: Parts, model: DDT, device: torch.device, run_dir: Path,
                results: Results, ledger: Ledger, tracker) -> None:
    if parts.extractor is not None:
        set_aside_stale_points(results, point_settings(plain, parts.extractor))
    if "cache_latents" in todo:
        ledger.enter(STAGE_STATE["cache_latents"], stage="cache_latents")
        _cache_latents(plain, parts, device, results)
    if "train" in todo:
        ledger.enter(STAGE_STATE["train"])
    step = _train(plain, model, run_dir, results, ledger, tracker, parts) if "train" in todo else None
    if "curve" in todo:
        ledger.enter(STAGE_STATE["curve"])
        _fill_curve(plain, run_dir, results, tracker, parts, kept_steps(run_dir), device)
    if "sample" in todo:
        ledger.enter(STAGE_STATE["sample"])
        _sample(plain, todo, model, run_dir, results, parts, step, tracker)
    if "evaluate" in todo and parts.extractor is not None and process_rank()[0] == 0:
        ledger.enter(STAGE_STATE["evaluate"])
        _evaluate(plain, run_dir, results, tracker, parts, device)
    if results.data.get("curve"):
        results.update(curve_cost=curve_cost(results.data))
    results.update(device_hours=device_hours(results.data))


def device_info(device: torch.device) -> dict:
    """The devices a run holds: type, model name and count (one per process), for its device-hours."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    return {"type": device.type, "name": name or device.type, "count": process_rank()[1]}


def _cache_latents(plain: dict, parts: Parts, device: torch.device, results: Results) -> None:
    data = plain["data"]
    rank, world_size = cache_rank(data.get("cache_rank"), data.get("cache_world_size"))
    stats = cache_latents(parts.image_folder, parts.codec, data["latents_dir"], shard_size=data["shard_size"],
                          batch_size=data["cache_batch_size"], rank=rank, world_size=world_size,
                          dtype=data["cache_dtype"], device=device, num_workers=data["num_workers"],
                          progress=plain["progress"])
    results.update(cache_latents={**stats, "rank": rank, "world_size": world_size,
                                  "latents_dir": str(data["latents_dir"])})


def _train(plain: dict, model: DDT, run_dir: Path, results: Results, ledger: Ledger, tracker, parts: Parts) -> int:
    ckpt, last = ckpt_path(plain), run_dir / "checkpoints" / "last.pt"
    if ckpt and not last.exists():
        load_weights(model, ckpt, ema=plain["ckpt_ema"])  # fine-tuning starts from these weights
        log.info("initialised from the EMA weights of %s", ckpt)
        load_projector(parts.objective, ckpt)
    train_cfg = TrainConfig(**plain["train"], num_workers=plain["data"]["num_workers"])
    grids = plain["logger"].get("sample_every", 0)
    every = plain["eval"]["every_steps"] if parts.extractor is not None else 0

    def curve_point(t: Trainer) -> None:  # the EMA weights in memory are those of step_N.pt
        ledger.progress(t.step, train_cfg.max_steps)
        ledger.enter("curve", step=t.step)
        _curve_point(plain, t.ema, t.step, run_dir, results, tracker, parts, stop=lambda: t.interrupt is not None)
        ledger.enter("training")

    def log_step(metrics: dict, step: int) -> None:  # the ledger's progress is what ddt.status shows
        tracker.log(metrics, step)
        ledger.progress(step, train_cfg.max_steps)

    trainer = Trainer(model, parts.train_data, train_cfg, run_dir=run_dir, seed=plain["seed"],
                      objective=parts.objective, log=log_step, progress=plain["progress"],
                      on_checkpoint=(lambda t: _log_grid(plain, t, tracker, parts)) if grids else None,
                      on_save=lambda t: ledger.checkpoint(t.step),
                      eval_every=every, on_eval=curve_point if every else None)
    if last.exists():
        start = resume_checkpoint(run_dir, say=True)  # last.pt, or the newest readable step_N.pt if it is damaged
        trainer.load(start)
        log.info("resuming from %s at step %d", start, trainer.step)
    ledger.progress(trainer.step, train_cfg.max_steps)
    if train_cfg.precision == "auto":  # machine- and width-dependent (ddt.train.autocast_dtype), kept on resume
        log.info("train.precision=auto: training in %s", "bf16 autocast" if trainer.autocast else "fp32")
    barrier()  # every rank knows where it starts before rank 0 may write last.pt again
    if every:  # points a kill or preemption interrupted (or a run trained without them) come first
        _fill_curve(plain, run_dir, results, tracker, parts,
                    [s for s in range(every, trainer.step + 1, every) if trainer.eval_due(s)], trainer.device)
    with checkpoint_on_preemption(trainer), stop_after_step_on_interrupt(trainer):
        stats = trainer.fit()
    if not stats["steps_this_session"]:  # strict JSON: no NaN loss for a session that trained nothing
        stats.update(final_loss=None, final_grad_norm=None, final_loss_note="no training step in this session")
    if stats["steps_this_session"]:
        results.invalidate("sample", "metrics", "evaluate")
    results.update(train=stats)
    model.load_state_dict(trainer.ema.state_dict())  # sample with the EMA weights
    return trainer.step


def _log_grid(plain: dict, trainer: Trainer, tracker, parts: Parts) -> None:
    """Log a grid of EMA samples (fixed noise and labels) every logger.sample_every steps."""
    if trainer.step % plain["logger"]["sample_every"] and trainer.step != trainer.cfg.max_steps:
        return
    ema, n = trainer.ema, plain["logger"]["grid_size"]
    device = next(ema.parameters()).device
    shape = (ema.in_channels, plain["resolution"]["latent_size"], plain["resolution"]["latent_size"])
    noise = sample_noise(torch.arange(n), shape, plain["seed"] + 2).to(device)
    x = sample(ema, noise, sample_labels(n, ema.num_classes).to(device), **sampler_kwargs(plain),
               generator=torch.Generator(device).manual_seed(plain["seed"]))
    if parts.codec is not None:
        parts.codec.to(device)
    images = (parts.codec.decode(x) if parts.codec is not None else to_uint8(x)).permute(0, 2, 3, 1).cpu().numpy()
    tracker.image("samples/ema_grid", image_grid(images, nrow=int(n ** 0.5)), trainer.step,
                  caption=f"EMA weights, step {trainer.step}")


def _write_samples(plain: dict, model: DDT, out_dir: Path, num_samples: int, weights: dict, parts: Parts,
                   stop=None) -> tuple[dict, dict]:
    """Sample num_samples images of `model` into out_dir/samples on every rank (image i on rank i mod
    world size; images already there are kept); returns (sampling stats, encoder-sharing schedule)."""
    sampler = plain["sampler"]
    model.eval()
    compile_model(model, sampler["compile"])
    device = next(model.parameters()).device
    if parts.codec is not None:
        parts.codec.to(device)
    latent_shape = (model.in_channels, plain["resolution"]["latent_size"], plain["resolution"]["latent_size"])
    schedule = recompute_schedule(model, plain, out_dir / "sharing_schedule.json", weights, latent_shape)
    rank, world_size = process_rank()
    samples_dir = out_dir / "samples"
    if rank == 0:
        # SDE images drawn before their step noise was per image (issue 41) are set aside, not mixed in
        noise = {"step_noise": "per_image"} if sampler["solver"] == "sde" else {}
        prepare_samples_dir(samples_dir, {**weights, "sampler": sampler, **noise})
    barrier()  # stale samples are moved aside before any rank writes new ones
    stats = generate_samples(model, samples_dir, num_samples=num_samples, batch_size=sampler["batch_size"],
                             seed=plain["seed"], latent_shape=latent_shape, progress=plain["progress"],
                             decode=parts.codec.decode if parts.codec is not None else to_uint8,
                             rank=rank, world_size=world_size, stop=stop,
                             sampler_kwargs={**sampler_kwargs(plain), "recompute_steps": schedule["recompute_steps"]})
    barrier()  # rank 0 reads the samples once every rank has written its share
    return {**stats, "rank": rank, "world_size": world_size}, schedule


def _sample(plain: dict, todo: list[str], model: DDT, run_dir: Path, results: Results, parts: Parts,
            step: int | None, tracker) -> None:
    ckpt, num_samples = ckpt_path(plain), plain["eval"]["num_samples"]
    if "train" not in todo:
        source = ckpt or run_dir / "checkpoints" / "last.pt"  # checked before any work (weights_problems)
        step = load_weights(model, source, ema=plain["ckpt_ema"])
        log.info("sampling with the %s weights of %s (step %s)", "EMA" if plain["ckpt_ema"] else "raw", source, step)
    weights = {"step": step, "ckpt": str(ckpt) if ckpt else None, "ckpt_ema": plain["ckpt_ema"], "seed": plain["seed"]}
    stats, schedule = _write_samples(plain, model, run_dir, num_samples, weights, parts)
    if stats["generated"]:
        results.invalidate("metrics", "evaluate")
    if stats["rank"] != 0:
        return
    samples_dir = run_dir / "samples"
    array = read_samples(samples_dir, num_samples)
    write_npz(array, sample_labels(num_samples, model.num_classes).numpy(), samples_dir / "samples.npz")
    write_grid(array, run_dir / "sample_grid.png")
    tracker.image("samples/final_grid", image_grid(array), step or 0, caption=f"{num_samples} samples")
    kwargs = sampler_kwargs(plain)
    results.update(sample={**stats, "step": step, **kwargs, "cfg_interval": list(kwargs["cfg_interval"]),
                           **schedule})


#################################################################################
#          Curves: the EMA weights evaluated every eval.every_steps steps       #
#################################################################################

def isc_protocol(plain: dict) -> str:
    """Which splits made the Inception Score (eval.isc_protocol), recorded beside every number."""
    return plain["eval"].get("isc_protocol", "adm")


# Below these sample counts a metric is mostly noise: IS estimates each split's class marginal (samples per
# class and split), KID averages over subsets, precision/recall estimate manifolds from k-NN radii.
MIN_IS_PER_CLASS, MIN_KID_SUBSET, MIN_PRC_POINTS = 5, 100, 100


def small_sample_warnings(plain: dict, num_samples: int) -> list[str]:
    """One line per metric that `num_samples` images are too few to mean anything for."""
    from ddt.adm_metrics import NHOOD_SIZE, SPLIT_SIZE

    ev, out, more = plain["eval"], [], "raise eval.num_samples (eval.curve_num_samples for curve points)"
    per_split = num_samples / 10 if isc_protocol(plain) == "torch_fidelity" else min(num_samples, SPLIT_SIZE)
    least = MIN_IS_PER_CLASS * plain["data"]["num_classes"]
    if per_split < least:
        out.append(f"IS from {num_samples} samples is {per_split:g} per split (fewer than {least}, "
                   f"{MIN_IS_PER_CLASS} per class): its value and spread mean little; {more}")
    if ev.get("kid") and num_samples < MIN_KID_SUBSET:
        out.append(f"KID subsets of {num_samples} samples (fewer than {MIN_KID_SUBSET}) give a noisy estimate; {more}")
    if ev.get("prc") and num_samples < max(MIN_PRC_POINTS, NHOOD_SIZE + 1):
        out.append(f"precision/recall from {num_samples} points with k={NHOOD_SIZE} neighbours (fewer than "
                   f"{MIN_PRC_POINTS}) mean little; {more}")
    return out


def _metrics(plain: dict, parts: Parts, samples_dir: Path, num_samples: int, device: torch.device) -> dict[str, float]:
    ev = plain["eval"]
    images = RunSamples(samples_dir, num_samples)  # exactly the run's images; a folder holding others stops here
    for warning in small_sample_warnings(plain, num_samples):
        log.warning("%s", warning)
    common = dict(cache_dir=plain["cache_dir"], reference_name=parts.reference_name,
                  batch_size=ev["feature_batch_size"], verbose=plain["progress"], device=device)
    metrics = calculate_metrics(images, parts.reference, feature_extractor=parts.extractor["name"],
                                weights_path=parts.extractor["weights"], prc=ev["prc"], kid=ev["kid"],
                                isc_protocol=isc_protocol(plain), **common)
    if parts.dinov2:  # the reference's features are cached by its content and the weights', as Inception's
        metrics["fd_dinov2"] = fd_dinov2(images, parts.reference, model=parts.dinov2["name"],
                                         weights_path=parts.dinov2["weights"], **common)
    return metrics


def _curve_point(plain: dict, model: DDT, step: int, run_dir: Path, results: Results, tracker, parts: Parts,
                 stop=None) -> None:
    """Sample and score the weights in `model` (those of step_N.pt) as the curve point of `step`."""
    start, ev = time.perf_counter(), plain["eval"]
    num_samples = ev["curve_num_samples"] or ev["num_samples"]
    point_dir = run_dir / "curve" / f"step_{step:07d}"
    weights = {"step": step, "ckpt": str(run_dir / "checkpoints" / f"step_{step}.pt"), "ckpt_ema": True,
               "seed": plain["seed"]}
    log.info("curve point at step %d: %d samples into %s", step, num_samples, point_dir)
    stats, _ = _write_samples(plain, model, point_dir, num_samples, weights, parts, stop=stop)
    if stats["stopped"]:
        log.warning("curve point at step %d interrupted; the rerun finishes it from %s", step, weights["ckpt"])
        return
    if stats["rank"] != 0:
        return
    metrics = _metrics(plain, parts, point_dir / "samples", num_samples, next(model.parameters()).device)
    _record_curve_point(plain, parts, results, tracker, step, metrics, num_samples, final=False,
                        wall_time_s=time.perf_counter() - start, sampled=stats)
    log.info("curve point at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _record_curve_point(plain: dict, parts: Parts, results: Results, tracker, step: int, metrics: dict,
                        num_samples: int, *, final: bool, wall_time_s: float, sampled: dict) -> None:
    """One point of the curve, in results.json and the tracker; `sampled`: the sample stage's stats of its images."""
    point = {"step": step, **metrics, "isc_protocol": isc_protocol(plain), "num_samples": num_samples, "final": final,
             "settings": point_settings(plain, parts.extractor), "wall_time_s": round(wall_time_s, 3),
             "sample_wall_time_s": sampled["wall_time_s"], "world_size": sampled["world_size"]}
    record_point(results, point)
    tracker.curve(point)


def _fill_curve(plain: dict, run_dir: Path, results: Results, tracker, parts: Parts, steps: list[int],
                device: torch.device) -> None:
    """Evaluate the kept checkpoints of `steps` that have no curve point yet (stage=curve, or on resume)."""
    have = {p["step"] for p in results.data.get("curve", [])}
    missing = [s for s in steps if s not in have]
    absent = [s for s in missing if not (run_dir / "checkpoints" / f"step_{s}.pt").exists()]
    if absent:
        log.warning("no kept checkpoint for the curve steps %s (checkpoints/step_N.pt): those points stay missing",
                    absent)
    todo = [s for s in missing if s not in absent]
    if not todo:
        return
    model = build_network(plain).to(device)
    for step in todo:
        load_weights(model, run_dir / "checkpoints" / f"step_{step}.pt", ema=True)
        _curve_point(plain, model, step, run_dir, results, tracker, parts)


def _evaluate(plain: dict, run_dir: Path, results: Results, tracker, parts: Parts, device: torch.device) -> None:
    ev = plain["eval"]
    start = time.perf_counter()  # the sample stage (implied by evaluate) made every image
    metrics = _metrics(plain, parts, run_dir / "samples", ev["num_samples"], device)
    seconds = round(time.perf_counter() - start, 3)
    results.update(metrics=metrics, feature_extractor=parts.extractor,
                   evaluate={"num_samples": ev["num_samples"], "reference": parts.reference_name,
                             "isc_protocol": isc_protocol(plain),
                             "feature_extractor_sha256": parts.extractor.get("sha256"), "wall_time_s": seconds,
                             **({"fd_dinov2_extractor": parts.dinov2} if parts.dinov2 else {})})
    step = (results.data.get("sample") or {}).get("step")
    if step is not None:  # the final point of the curve (an official checkpoint has no step)
        sampled = results.data["sample"]
        _record_curve_point(plain, parts, results, tracker, step, metrics, ev["num_samples"], final=True,
                            wall_time_s=sampled["wall_time_s"] + seconds, sampled=sampled)
    tracker.summary(metrics)
    log.info("metrics: %s", "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
