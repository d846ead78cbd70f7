"""Speed and memory of every hot path: training step, sampling, evaluation and data loading.

    python -m benchmarks.run --suite cpu                       # this machine, fp32 (about 15 minutes)
    python -m benchmarks.run --suite gpu                       # CUDA, bf16 autocast, model FLOP utilisation
    python -m benchmarks.run --suite cpu --official PATH       # + the official DDT module side by side
    python -m benchmarks.run --suite official --official PATH  # only that comparison (training and sampling)
    python -m benchmarks.run --suite precision                 # bf16 autocast against fp32 training, by width
    python -m benchmarks.run --suite threads                   # training beside a second 2-thread process
    python -m benchmarks.run --suite smoke                     # seconds: what the test suite runs
    python -m benchmarks.run --suite cpu --only sample         # re-run one kind of row, keep the others

PATH is a copy of github.com/MCG-NJU/DDT's src/models/denoiser/decoupled_improved_dit.py (not shipped
here). Every measurement runs in a fresh subprocess, so peak memory is its own and compile caches
and thread pools do not leak between rows. Writes benchmarks/results/run-<suite>.{json,md} and prints
the tables. Numbers, not assertions: the README's performance section is this output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, sync
from benchmarks.flops import count_flops, model_flops
from ddt.config import model_group
from ddt.train import cpu_has_bf16_units

RESULTS = Path(__file__).parent / "results"
# Dense bf16 tensor-core peak (FLOP/s) of the GPUs we report MFU for, from the vendors' data sheets.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn, each synchronised."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def round_robin(runs: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each fn in runs per round, the fns called in turn `repeats` times (a speed drift hits all alike)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += timed(fn, device, 1)
    return times


def best_round_robin(runs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall seconds of each fn in runs, timed round robin."""
    return {name: min(seconds) for name, seconds in round_robin(runs, device, repeats).items()}


def round_ratios(times: dict[str, list[float]], slower: str, faster: str) -> dict[str, float]:
    """Speedup of `faster` over `slower` in each round (same round, same machine speed): median, min, max.

    This machine's speed drifts by 5-20% within minutes; a ratio taken inside one round cancels the drift,
    and a range that includes 1.0 says the two are not told apart by this run.
    """
    ratios = [a / b for a, b in zip(times[slower], times[faster])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def row_peak(p: dict, device: torch.device) -> float:
    """The matmul peak (FLOP/s) at the row's precision, measured in the row's own process (speed drifts)."""
    return matmul_peak(device, torch.bfloat16 if p["precision"] == "bf16" else torch.float32, p["peak_n"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Best measured FLOP/s of an n×n matrix product (the roofline the utilisation numbers use)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        best = max(best, 2 * n**3 / min(timed(lambda: a @ b, device, 3)))
    return best


#################################################################################
#                        Measurements (one per subprocess)                      #
#################################################################################

def _model(spec: dict, device: torch.device):
    from ddt.models import build_model

    torch.manual_seed(0)
    model = build_model("ddt", **spec).to(device)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero velocity to integrate
    return model


def _batch(spec: dict, batch_size: int, size: int, device: torch.device) -> dict:
    """A training batch as the datasets give it: uint8 pixels, or cached VAE moments (latent models)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, spec["in_channels"], size, size)
    labels = torch.randint(0, spec["num_classes"], (batch_size,), generator=g)
    if spec["in_channels"] == 3:
        return {"images": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8), "labels": labels}
    return {"mean": torch.randn(shape, generator=g), "std": torch.rand(shape, generator=g) * 0.1, "labels": labels}


def _objective(spec: dict):
    """The flow-matching objective for a model spec: latent models train on cached, scaled VAE moments."""
    from ddt.objective import Objective

    return Objective(scaling_factor=0.18215 if spec["in_channels"] == 4 else None)


def _trainer(p: dict, device: torch.device):
    """A Trainer of the row's model and a batch for it (Trainer.train_step(batch) is one training step)."""
    from ddt.train import Trainer, TrainConfig

    cfg = TrainConfig(max_steps=0, batch_size=p["batch_size"], precision=p["precision"], compile=p["compile"],
                      activation_checkpointing=p.get("activation_checkpointing", False))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_model(p["model"], device), [], cfg, run_dir=tmp, seed=0, objective=_objective(p["model"]),
                          progress=False)
    return trainer, _batch(p["model"], p["batch_size"], p["size"], device)


def measure_train(p: dict, device: torch.device) -> dict:
    """Images/s, step time and peak memory of Trainer.train_step (forward, backward, fused AdamW, EMA)."""
    trainer, batch = _trainer(p, device)
    model = trainer.model
    first = timed(lambda: trainer.train_step(batch), device, 1)[0]  # includes compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: trainer.train_step(batch), device, p["steps"])
    step, peak_mb = statistics.median(times), peak_memory_mb(device)
    eager_flops = model_flops(lambda: trainer.forward_backward(batch)) if not p["compile"] else None
    peak = row_peak(p, device)
    return {"step_s": step, "first_step_s": first, "images_per_s": p["batch_size"] / step,
            "peak_memory_mb": peak_mb, "flops_per_step": eager_flops, "matmul_peak_flops": peak,
            "parameters": sum(x.numel() for x in model.parameters())}


def measure_precision(p: dict, device: torch.device) -> dict:
    """Trainer.train_step with bf16 autocast against fp32 on the same model and batch, timed round robin
    (what train.precision=auto weighs on a CPU with bf16 units)."""
    from ddt.train import Trainer, TrainConfig

    batch = _batch(p["model"], p["batch_size"], p["size"], device)
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(max_steps=0, batch_size=p["batch_size"], precision=precision, compile=p["compile"])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(_model(p["model"], device), [], cfg, run_dir=tmp, seed=0,
                              objective=_objective(p["model"]), progress=False)
        timed(lambda trainer=trainer: trainer.train_step(batch), device, 2)  # warm-up (and compile)
        runs[precision] = lambda trainer=trainer: trainer.train_step(batch)
    times = round_robin(runs, device, p["repeats"])
    return {**{f"{k}_s": statistics.median(v) for k, v in times.items()},
            "speedup_rounds": round_ratios(times, "fp32", "bf16")}


def _official_pair(p: dict, device: torch.device):
    """The official DDT module (from the file p["official"]) and ours with the same weights, and an input."""
    from ddt.models import DDT

    spec = importlib.util.spec_from_file_location("official_ddt", p["official"])
    official_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official_module)
    m = p["model"]
    torch.manual_seed(0)
    official = official_module.DDT(in_channels=m["in_channels"], num_groups=m["num_heads"], hidden_size=m["hidden_size"],
                                   num_blocks=m["depth"], num_encoder_blocks=m["encoder_depth"],
                                   patch_size=m["patch_size"], num_classes=m["num_classes"]).to(device)
    torch.nn.init.normal_(official.final_layer.linear.weight, std=0.02)  # a non-zero velocity
    ours = DDT(**m).to(device)
    ours.load_state_dict(official.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p["batch_size"], m["in_channels"], p["size"], p["size"], generator=g).to(device)
    t, y = torch.rand(p["batch_size"], generator=g).to(device), torch.randint(0, m["num_classes"], (p["batch_size"],)).to(device)
    return official, ours, x, t, y


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh module of the same class and weights (compiling one copy leaves the eager one eager)."""
    import copy

    return copy.deepcopy(model)


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _first_calls(runs: dict) -> dict[str, float]:
    """Seconds of the first call of each run, in order: for compiled models, the cold compile."""
    out = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return out


def measure_official(p: dict, device: torch.device) -> dict:
    """Forward+backward of the official module and of ours, eager and compiled each its own way
    (official: torch.compile of the whole module, as its `compile: true`; ours: ddt.models.compile_model),
    same weights and input, timed round robin; cold compile seconds and recompiles after the first step."""
    from ddt.models import compile_model

    official, ours, x, t, y = _official_pair(p, device)
    with torch.no_grad():
        max_diff = (official(x, t, y)[0] - ours(x, t, y)[0]).abs().max().item()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=p["precision"] == "bf16")

    def step(model):
        def run():
            with autocast:
                loss = model(x, t, y)[0].float().square().mean()
            loss.backward()
        return run

    counted = count_flops(step(ours))
    flops = counted["total"]
    peak = row_peak(p, device)
    out = {"flops": flops, "attention_flops": counted["attention"], "matmul_peak_flops": peak,
           "max_abs_diff": max_diff}
    runs = {"official": step(official), "official_compiled": step(torch.compile(_copy(official))),
            "ours": step(ours), "ours_compiled": step(compile_model(_copy(ours)))}
    graphs = _graphs()
    # ours first, so that its cold compile does not reuse kernels the official compile made
    out["cold_compile_s"] = _first_calls({k: runs[k] for k in ("ours_compiled", "official_compiled")})
    for run in runs.values():
        timed(run, device, 2)  # warm-up (the second step of a compiled model may compile backward variants)
    warm_graphs = _graphs()
    times = round_robin(runs, device, p["repeats"])
    for name, seconds in times.items():
        best = min(seconds)
        out[name] = {"seconds": best, "flops_per_s": flops / best, "fraction_of_peak": flops / best / peak}
    out["speedup_rounds"] = {"eager": round_ratios(times, "official", "ours"),
                             "compiled": round_ratios(times, "official_compiled", "ours_compiled")}
    out["graphs_compiled"] = warm_graphs - graphs
    out["recompiles_after_warmup"] = _graphs() - warm_graphs
    return out


def official_euler(net, noise: torch.Tensor, labels: torch.Tensor, *, null_label: int, num_steps: int,
                   cfg_scale: float, refresh_every: int) -> torch.Tensor:
    """The official EulerSampler loop (stateful_flow_matching/sampling.py, timeshift 1): cond and uncond
    batched at every step, the encoder state s refreshed every `refresh_every` steps, guidance on the
    open interval (0, 1)."""
    grid = torch.cat([torch.linspace(0.0, 1 - 1 / num_steps, num_steps), torch.tensor([1.0])]).to(noise.device)
    null = torch.full_like(labels, null_label)
    cfg_labels, x, state = torch.cat([null, labels]), noise, None
    for i in range(num_steps):
        t = grid[i].repeat(len(x))
        if i % refresh_every == 0:
            state = None
        out, state = net(torch.cat([x, x]), t.repeat(2), cfg_labels, state)
        uncond, cond = out.chunk(2)
        w = cfg_scale if 0 < grid[i] < 1 else 1.0
        x = x + (uncond + w * (cond - uncond)) * (grid[i + 1] - grid[i])
    return x


def measure_official_sample(p: dict, device: torch.device) -> dict:
    """Euler sampling with CFG: the official module compiled its way in the official sampler loop against
    ours (ddt.sampling.sample, compile_model), without and with encoder sharing; images/s and how far apart."""
    from ddt.models import compile_model
    from ddt.sampling import sample, uniform_recompute_steps

    official, ours, x, _, labels = _official_pair(p, device)
    official, ours = torch.compile(official.eval()), compile_model(ours.eval())
    steps, every = p["num_steps"], p["every"]
    recompute = uniform_recompute_steps(steps, -(-steps // every))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=p["precision"] == "bf16")
    outputs = {}

    def run(name: str, sharing: bool):
        def go():
            with autocast, torch.no_grad():
                if name == "official":
                    outputs[name, sharing] = official_euler(official, x, labels, null_label=p["model"]["num_classes"],
                                                            num_steps=steps, cfg_scale=p["cfg_scale"],
                                                            refresh_every=every if sharing else 1)
                else:
                    outputs[name, sharing] = sample(ours, x, labels, num_steps=steps, cfg_scale=p["cfg_scale"],
                                                    recompute_steps=recompute if sharing else None)
        return go

    runs = {f"{name} {'sharing' if sharing else 'none'}": run(name, sharing)
            for sharing in (False, True) for name in ("ours", "official")}
    for go in runs.values():
        go()  # compiles (the official module's encoder-skipping call is a second graph)
    graphs = _graphs()
    times = round_robin(runs, device, p["repeats"])
    best = {name: min(seconds) for name, seconds in times.items()}
    out = {name: {"seconds": s, "images_per_s": p["batch_size"] / s} for name, s in best.items()}
    for sharing in (False, True):
        key = "sharing" if sharing else "none"
        out[f"speedup {key}"] = best[f"official {key}"] / best[f"ours {key}"]
        out[f"speedup_rounds {key}"] = round_ratios(times, f"official {key}", f"ours {key}")
        out[f"max_abs_diff {key}"] = (outputs["ours", sharing] - outputs["official", sharing]).abs().max().item()
    out["recompiles_after_warmup"] = _graphs() - graphs
    return out


def measure_sample(p: dict, device: torch.device) -> dict:
    """Images/s of Euler sampling with CFG (one batched cond/uncond call), without and with encoder sharing."""
    from benchmarks.sharing import bound, pass_costs
    from ddt.models import compile_model
    from ddt.sampling import sample, uniform_recompute_steps

    model = compile_model(_model(p["model"], device).eval(), p["compile"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(p["batch_size"], p["model"]["in_channels"], p["size"], p["size"], generator=g).to(device)
    labels = torch.arange(p["batch_size"], device=device) % p["model"]["num_classes"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=p["precision"] == "bf16")

    def run(num_steps: int, recompute_steps: list[int] | None) -> None:
        with autocast:
            sample(model, noise, labels, num_steps=num_steps, cfg_scale=p["cfg_scale"], recompute_steps=recompute_steps)

    run(2, [0])  # warm-up (and compilation): the same encoder and decoder calls, two steps
    out = {}
    for steps in p["num_steps"]:
        recompute = uniform_recompute_steps(steps, -(-steps // p["every"]))
        best = best_round_robin({"none": lambda: run(steps, None), "uniform": lambda: run(steps, recompute)},
                                device, p["repeats"])
        row = {name: {"seconds": t, "images_per_s": p["batch_size"] / t} for name, t in best.items()}
        row["speedup"] = row["none"]["seconds"] / row["uniform"]["seconds"]
        out[str(steps)] = row
    with autocast:  # the FLOP bound of recomputing every `every` steps (guided: 2B rows per pass)
        costs = pass_costs(model, torch.cat([noise, noise]), torch.cat([labels, labels]))
    flop_bound = bound(costs["encoder"]["flops"], costs["decoder"]["flops"], p["every"])
    for row in out.values():
        row["flop_bound"] = flop_bound
        row["fraction_of_bound"] = row["speedup"] / flop_bound
    return out


def measure_eval(p: dict, device: torch.device) -> dict:
    """Inception feature extraction images/s and the wall time of a whole FID/IS computation."""
    from torch_fidelity.utils import create_feature_extractor

    from benchmarks.random_weights import save_random_inception
    from ddt.metrics import calculate_metrics

    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (p["num_samples"], 3, p["size"], p["size"]), generator=g, dtype=torch.uint8)
    reference = torch.randint(0, 256, (p["num_samples"], 3, p["size"], p["size"]), generator=g, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_inception(Path(tmp) / "inception-random.pth")
        extractor = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(weights),
                                             cuda=device.type == "cuda", verbose=False)
        batch = samples[: p["batch_size"]].to(device)
        with torch.no_grad():
            extractor(batch)  # warm-up
            seconds = min(timed(lambda: extractor(batch), device, 3))
        kwargs = dict(feature_extractor="inception-v3-compat", weights_path=weights, cache_dir=tmp,
                      prc=False, batch_size=p["batch_size"], verbose=False)
        start = time.perf_counter()
        calculate_metrics(samples, reference, reference_name="reference", **kwargs)  # both sides extracted
        cold = time.perf_counter() - start
        start = time.perf_counter()
        calculate_metrics(samples, reference, reference_name="reference", **kwargs)  # reference features cached
        cached = time.perf_counter() - start
    return {"fid_seconds_cold": cold, "fid_seconds_cached_reference": cached,
            "feature_images_per_s": p["batch_size"] / seconds}


def measure_data(p: dict, device: torch.device) -> dict:
    """Latent-cache read images/s through the training DataLoader (StepBatches order, memory-mapped shards)."""
    from benchmarks.common import write_folder
    from benchmarks.random_weights import save_tiny_vae
    from ddt.data.imagenet import ImageFolder
    from ddt.data.latents import LatentDataset, cache_latents
    from ddt.data.order import StepBatches
    from ddt.models.vae import LatentCodec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codec = LatentCodec.from_pretrained(str(save_tiny_vae(tmp / "vae")))  # 8x down, 4 channels, as SD-VAE
        folder = ImageFolder(write_folder(tmp / "images", p["images"]), p["image_size"])
        cache_latents(folder, codec, tmp / "latents", shard_size=p["images"] // 4, batch_size=32, progress=False)
        dataset = LatentDataset(tmp / "latents")
        order = StepBatches(0, p["batches"], p["batch_size"], len(dataset), seed=0)
        loader = torch.utils.data.DataLoader(dataset, sampler=order, batch_size=None, num_workers=p["workers"],
                                             pin_memory=device.type == "cuda")
        start = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync(device)
        seconds = time.perf_counter() - start
    return {"images_per_s": p["batches"] * p["batch_size"] / seconds, "latent_shape": list(dataset.latent_shape)}


def _seconds_per_step(step, device: torch.device, seconds: float) -> float:
    """Mean wall seconds of a training step over a window of about `seconds` (at least two steps)."""
    sync(device)
    start, steps = time.perf_counter(), 0
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    sync(device)
    return (time.perf_counter() - start) / steps


def measure_contention(p: dict, device: torch.device) -> dict:
    """The training step rate with its threads sized as a run sizes them (ddt.threads), alone and with a second
    process of p["neighbour_threads"] threads training the same model beside it, in alternating windows (the
    neighbour paused with SIGSTOP while this one runs alone); the ratio beside / alone is taken in each round."""
    import signal

    from ddt.threads import keep_bits_or_fix_threads, size_threads

    threads = size_threads()
    trainer, batch = _trainer(p, device)
    keep_bits_or_fix_threads(lambda: trainer._gradients(batch))  # as Trainer.fit does on its first batch
    step = lambda: trainer.train_step(batch)  # noqa: E731
    timed(step, device, 2)  # warm-up
    env = {**os.environ, "OMP_NUM_THREADS": str(p["neighbour_threads"])}
    neighbour = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--device", device.type, "--one",
                                  json.dumps({**p, "kind": "neighbour"})], stdout=subprocess.PIPE, text=True,
                                 cwd=Path(__file__).parent.parent, env=env)
    times: dict[str, list[float]] = {"alone": [], "beside": []}
    try:
        if neighbour.stdout.readline().strip() != "training":
            raise RuntimeError(f"the neighbour process did not start (exit {neighbour.wait()})")
        for _ in range(p["rounds"]):
            for name, sig in (("alone", signal.SIGSTOP), ("beside", signal.SIGCONT)):
                neighbour.send_signal(sig)
                times[name].append(_seconds_per_step(step, device, p["seconds"]))
    finally:
        neighbour.kill()
        neighbour.wait()
    return {"threads": threads, "neighbour_threads": p["neighbour_threads"], "cpus": len(os.sched_getaffinity(0)),
            "alone_steps_per_s": 1 / statistics.median(times["alone"]),
            "beside_steps_per_s": 1 / statistics.median(times["beside"]),
            "ratio_rounds": round_ratios(times, "alone", "beside"), "load_average_1min": os.getloadavg()[0]}


def measure_neighbour(p: dict, device: torch.device) -> dict:
    """The second process of measure_contention: trains the row's model with its own threads until killed."""
    torch.set_num_threads(p["neighbour_threads"])
    trainer, batch = _trainer(p, device)
    trainer.train_step(batch)
    print("training", flush=True)
    while True:
        trainer.train_step(batch)


def measure_peak(p: dict, device: torch.device) -> dict:
    """Matmul FLOP/s per dtype; size n per dtype (a CPU without bf16 instructions needs a small one)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {name: matmul_peak(device, dtypes[name], n) for name, n in p["n"].items()}


MEASURE = {"train": measure_train, "precision": measure_precision, "official": measure_official,
           "official_sample": measure_official_sample, "sample": measure_sample,
           "eval": measure_eval, "data": measure_data, "peak": measure_peak, "contention": measure_contention,
           "neighbour": measure_neighbour}


#################################################################################
#                                     Suites                                    #
#################################################################################

SPEC_KEYS = ("in_channels", "patch_size", "hidden_size", "num_heads", "depth", "encoder_depth", "num_classes")


def preset_spec(preset: str, **overrides) -> dict:
    """A row's model: the network arguments of a conf/model preset (ddt.config.model_group) with `overrides`."""
    group = model_group(preset, **overrides)
    return {k: group[k] for k in SPEC_KEYS}


DIGITS = dict(in_channels=3, num_classes=10)  # the quickstart's data (resolution=r16, data=digits)
QUICKSTART = preset_spec("quickstart", **DIGITS)  # 16 px
QUICKSTART_64_TOKENS = {**QUICKSTART, "patch_size": 2}  # the overhead-bound shape
S, B, XL = preset_spec("S"), preset_spec("B"), preset_spec("XL")
S_10EN2DE = preset_spec("S", encoder_depth=10)
TINY = preset_spec("quickstart", **DIGITS, depth=4, encoder_depth=2, hidden_size=32, num_heads=2)


def _train_rows(models: list[tuple[str, dict, int, int]], precision: str, steps: int, compile_too: bool,
                peak_n: int) -> list[dict]:
    rows = []
    for name, spec, size, batch_size in models:
        for compiled in (False, True) if compile_too else (False,):
            rows.append(dict(kind="train", name=name, model=spec, size=size, batch_size=batch_size,
                             precision=precision, compile=compiled, steps=steps, peak_n=peak_n))
    return rows


def contention_row(name: str, spec: dict, batch_size: int, seconds: float, rounds: int) -> dict:
    """A row of the training step rate beside a second process of 2 threads, against alone (16 px, fp32)."""
    return dict(kind="contention", name=name, model=spec, size=16, batch_size=batch_size, precision="fp32",
                compile=False, neighbour_threads=2, seconds=seconds, rounds=rounds)


def official_rows(official: str, precision: str) -> list[dict]:
    """The two shapes of the official comparison, training (forward+backward) and sampling."""
    return [dict(kind="official", name="compute-bound: S/2, batch 8, 4x32x32", official=official, model=S, size=32,
                 batch_size=8, repeats=8, precision=precision, peak_n=2048),
            dict(kind="official", name="overhead-bound: quickstart width, batch 64, 64 tokens", official=official,
                 model=QUICKSTART_64_TOKENS, size=16, batch_size=64, repeats=16, precision=precision, peak_n=2048),
            dict(kind="official_sample", name="quickstart width, 64 tokens", official=official,
                 model=QUICKSTART_64_TOKENS, size=16, batch_size=64, num_steps=50, every=4, cfg_scale=2.0,
                 repeats=2, precision=precision)]


def suite(name: str, official: str | None) -> list[dict]:
    """The measurements of a suite, in order."""
    if name == "smoke":
        rows = [dict(kind="peak", n={"fp32": 256})]
        rows += _train_rows([("tiny", TINY, 16, 8)], "fp32", 2, compile_too=False, peak_n=256)
        rows += [dict(kind="sample", name="tiny", model=TINY, size=16, batch_size=4, num_steps=[4], every=2,
                      cfg_scale=2.0, precision="fp32", compile=False, repeats=1),
                 dict(kind="eval", num_samples=20, size=32, batch_size=10),
                 dict(kind="data", images=16, image_size=64, batch_size=8, batches=4, workers=0),
                 dict(kind="precision", name="tiny", model=TINY, size=16, batch_size=8, compile=False, repeats=1),
                 contention_row("tiny", TINY, 8, seconds=0.5, rounds=1)]
        if official:
            rows += [dict(kind="official", name="tiny", official=official, model=TINY, size=16, batch_size=4,
                          repeats=1, precision="fp32", peak_n=256),
                     dict(kind="official_sample", name="tiny", official=official, model=TINY, size=16, batch_size=4,
                          num_steps=4, every=2, cfg_scale=2.0, repeats=1, precision="fp32")]
        return rows
    if name == "threads":  # the quickstart's step rate with a second 2-thread process beside it, against alone
        return [dict(kind="peak", n={"fp32": 1024}), contention_row("quickstart", QUICKSTART, 64, seconds=10, rounds=5)]
    if name == "official":  # the official comparison alone (CPU): fp32, and bf16 where the CPU has bf16 units
        if not official:
            raise ValueError("--suite official needs --official PATH (the official decoupled_improved_dit.py)")
        rows = [dict(kind="peak", n={"fp32": 2048, "bf16": 2048 if cpu_has_bf16_units() else 512})]
        for precision in ("fp32", "bf16") if cpu_has_bf16_units() else ("fp32",):
            rows += official_rows(official, precision)
        return rows
    if name == "precision":  # bf16 autocast against fp32 training by width: where train.precision=auto switches
        rows = [dict(kind="peak", n={"fp32": 2048, "bf16": 2048 if cpu_has_bf16_units() else 512})]
        for width in (64, 128, 256):
            for patch_size in (4, 2):  # 16 and 64 tokens
                model = preset_spec("quickstart", **DIGITS, hidden_size=width, num_heads=width // 16,
                                    patch_size=patch_size)
                rows.append(dict(kind="precision", name=f"28 blocks 22en6de, width {width}", model=model, size=16,
                                 batch_size=64, compile=False, repeats=6))
        rows.append(dict(kind="precision", name="DDT-S/2", model=S, size=32, batch_size=8, compile=False, repeats=4))
        return rows
    if name == "cpu":
        rows = [dict(kind="peak", n={"fp32": 2048, "bf16": 512})]
        rows += _train_rows([("quickstart", QUICKSTART, 16, 64), ("DDT-S/2", S, 32, 8), ("DDT-B/2", B, 32, 4)],
                            "fp32", 5, compile_too=True, peak_n=2048)
        rows.append(dict(kind="train", name="DDT-B/2 (activation checkpointing)", model=B, size=32, batch_size=4,
                         precision="fp32", compile=False, steps=5, activation_checkpointing=True, peak_n=2048))
        rows += [dict(kind="sample", name="quickstart", model=QUICKSTART, size=16, batch_size=64, num_steps=[50, 250],
                      every=4, cfg_scale=2.0, precision="fp32", compile=compiled, repeats=2) for compiled in (False, True)]
        rows.append(dict(kind="sample", name="10en2de (S width, 64 tokens)", model=S_10EN2DE, size=16, batch_size=8,
                         num_steps=[50], every=4, cfg_scale=2.0, precision="fp32", compile=False, repeats=2))
        rows.append(contention_row("quickstart", QUICKSTART, 64, seconds=10, rounds=5))
        rows += [dict(kind="eval", num_samples=500, size=64, batch_size=50),
                 *[dict(kind="data", images=256, image_size=256, batch_size=64, batches=40, workers=w) for w in (0, 2)]]
        if official:
            rows += official_rows(official, "fp32")
            if cpu_has_bf16_units():  # the official recipe trains in bf16-mixed; without the units bf16 is emulated
                rows += official_rows(official, "bf16")
        return rows
    if name == "gpu":  # most important first: a suite cut short keeps what it measured
        rows = [dict(kind="peak", n={"fp32": 8192, "bf16": 8192})]
        rows += _train_rows([("DDT-XL/2", XL, 32, 64)], "bf16", 10, compile_too=True, peak_n=8192)
        rows.append(dict(kind="train", name="DDT-XL/2", model=XL, size=32, batch_size=128, precision="bf16",
                         compile=True, steps=10, peak_n=8192))
        if official:
            rows.append(dict(kind="official", name="DDT-XL/2, batch 64, 4x32x32", official=official, model=XL,
                             size=32, batch_size=64, repeats=5, precision="bf16", peak_n=8192))
        rows += [dict(kind="sample", name="DDT-XL/2", model=XL, size=32, batch_size=32, num_steps=[50, 250], every=4,
                      cfg_scale=2.0, precision="bf16", compile=False, repeats=1),
                 dict(kind="sample", name="10en2de (S/2)", model=S_10EN2DE, size=32, batch_size=64, num_steps=[50],
                      every=4, cfg_scale=2.0, precision="bf16", compile=False, repeats=2)]
        rows += _train_rows([("DDT-S/2", S, 32, 256), ("DDT-B/2", B, 32, 256)], "bf16", 10, compile_too=False,
                            peak_n=8192)
        rows += [dict(kind="eval", num_samples=5000, size=256, batch_size=250),
                 dict(kind="data", images=512, image_size=256, batch_size=256, batches=40, workers=8),
                 dict(kind="train", name="DDT-XL/2 (activation checkpointing)", model=XL, size=32, batch_size=64,
                      precision="bf16", compile=False, steps=5, activation_checkpointing=True, peak_n=8192)]
        return rows
    raise ValueError(f"--suite {name!r} is unknown; use smoke, cpu, threads, official, precision or gpu")


def run_one(params: dict, device: str) -> dict:
    """One measurement in a fresh interpreter; its JSON result is the last line it prints."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", device, "--one", json.dumps(params)]
    with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache: compile times are cold ones
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if proc.returncode:
        raise RuntimeError(f"benchmark {params['kind']} {params.get('name', '')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#################################################################################
#                                     Report                                    #
#################################################################################

def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def _rounds_cell(rounds: dict | None) -> str:
    """A per-round speedup as 'median (min-max)'; '-' for results from before rounds were kept."""
    if not rounds:
        return "-"
    return f"{rounds['median']:.2f}x ({rounds['min']:.2f}-{rounds['max']:.2f})"


def _tokens(row: dict) -> int:
    return (row["size"] // row["model"]["patch_size"]) ** 2


def report(result: dict) -> str:
    """The markdown tables of a suite's results."""
    m, rows = result["machine"], result["rows"]
    peak = next(r["result"] for r in rows if r["kind"] == "peak")
    gpu_peak = next((v for k, v in GPU_PEAK_BF16.items() if k in m.get("gpu", "")), None)
    lines = [f"Machine: {m.get('gpu', m['cpu'])} ({m['cpu']}, {m['threads']} threads), torch {m['torch']}; "
             f"matmul peak measured first " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items())
             + " (training and official rows divide by the peak measured in their own process).", ""]
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        # FLOPs are counted on the eager rows and are linear in the batch: compiled rows use them per image.
        per_image = {r["name"]: r["result"]["flops_per_step"] / r["batch_size"] for r in train
                     if r["result"]["flops_per_step"]}
        body = []
        for r in train:
            res = r["result"]
            f = per_image[r["name"]] * r["batch_size"] if r["name"] in per_image else None
            # the peak measured in the row's own process (machine speed drifts); older results: the suite's
            ref_peak = res.get("matmul_peak_flops", peak["bf16" if r["precision"] == "bf16" else "fp32"])
            mfu = f"{100 * f / res['step_s'] / ref_peak:.0f}%" if f else "-"
            spec_mfu = f"{100 * f / res['step_s'] / gpu_peak:.0f}%" if f and gpu_peak else "-"
            body.append([r["name"], r["batch_size"], _tokens(r), r["precision"], "yes" if r["compile"] else "no",
                         f"{res['step_s']:.3f}", f"{res['images_per_s']:.1f}", f"{res['peak_memory_mb']:.0f}",
                         f"{f / 1e9:.2f}" if f else "-", mfu, spec_mfu, f"{res['first_step_s']:.1f}"])
        lines += ["Training step (forward, backward, fused AdamW, EMA; `Trainer.train_step`):", ""]
        lines += _table(["model", "batch", "tokens", "precision", "compile", "step s", "img/s", "peak MB",
                         "GFLOP/step", "of matmul peak", "MFU (spec bf16 peak)", "first step s"], body)
    official = [r for r in rows if r["kind"] == "official"]
    if official:
        body = []
        for r in official:
            res = r["result"]
            # % of peak with attention counted, then without it (how torch's counter alone counts on CPU);
            # results from before the attention count was recorded give the first only
            attention = res.get("attention_flops")

            def cell(name: str) -> str:
                share = res[name]["fraction_of_peak"]
                text = f"{res[name]['seconds']:.3f} s ({100 * share:.0f}%"
                if attention is not None:
                    text += f" / {100 * (1 - attention / res['flops']) * share:.0f}%"
                return text + ")"
            gflop = f"{res['flops'] / 1e9:.2f}" + (f" ({attention / 1e9:.2f})" if attention is not None else "")
            compiled = "official_compiled" in res  # results from before the official compile was timed lack it
            speedup = (f"{res['official_compiled']['seconds'] / res['ours_compiled']['seconds']:.2f}x"
                       if compiled else "-")
            cold = res.get("cold_compile_s", {})
            body.append([r["name"], r["precision"], gflop, cell("official"),
                         cell("official_compiled") if compiled else "-", cell("ours"), cell("ours_compiled"),
                         f"{res['official']['seconds'] / res['ours']['seconds']:.2f}x", speedup,
                         _rounds_cell(res.get("speedup_rounds", {}).get("compiled")),
                         " / ".join(f"{cold[k]:.0f}" for k in ("ours_compiled", "official_compiled") if k in cold) or "-",
                         res.get("recompiles_after_warmup", "-"), f"{res['max_abs_diff']:.1e}"])
        lines += ["Forward+backward against the official module (same weights and input, timed round robin; "
                  "official compiled = `torch.compile` of the whole module, as its `compile: true`; ours compiled "
                  "= `ddt.models.compile_model`; % of the matmul peak measured in the same process, counting all "
                  "FLOPs / only the matrix products outside attention; speedups from the best step of each; "
                  "per round: official compiled / ours compiled within each round, median (min-max) over the "
                  "rounds; a range that includes 1.00 does not tell the two apart):", ""]
        lines += _table(["shape", "precision", "GFLOP (attention)", "official", "official compiled", "ours",
                         "ours compiled", "speedup eager", "speedup compiled", "speedup compiled per round",
                         "cold compile s (ours / official)",
                         "recompiles after warm-up", "max abs diff"], body)
    official_sampling = [r for r in rows if r["kind"] == "official_sample"]
    if official_sampling:
        body = []
        for r in official_sampling:
            res = r["result"]
            for key in ("none", "sharing"):
                body.append([r["name"], r["batch_size"], r["num_steps"], r["precision"], key,
                             f"{res['official ' + key]['images_per_s']:.2f}", f"{res['ours ' + key]['images_per_s']:.2f}",
                             f"{res['speedup ' + key]:.2f}x", _rounds_cell(res.get("speedup_rounds " + key)),
                             f"{res['max_abs_diff ' + key]:.1e}",
                             res["recompiles_after_warmup"]])
        lines += [f"Euler sampling with CFG {official_sampling[0]['cfg_scale']}, both compiled: the official module "
                  f"(`torch.compile`) in the official sampler loop (cond and uncond batched at every step; sharing: "
                  f"state refreshed every {official_sampling[0]['every']} steps) against `ddt.sampling.sample` on "
                  f"`compile_model` (sharing: uniform, the same steps), timed round robin (speedup from the best "
                  f"run of each; per round: median (min-max) of the rounds' ratios):", ""]
        lines += _table(["model", "batch", "steps", "precision", "sharing", "official img/s", "ours img/s", "speedup",
                         "speedup per round", "max abs diff of the samples", "recompiles after warm-up"], body)
    precision = [r for r in rows if r["kind"] == "precision"]
    if precision:
        body = [[r["name"], r["batch_size"], _tokens(r), "yes" if r["compile"] else "no",
                 f"{r['result']['fp32_s']:.3f}", f"{r['result']['bf16_s']:.3f}",
                 _rounds_cell(r["result"]["speedup_rounds"])] for r in precision]
        lines += ["bf16 autocast against fp32 (`Trainer.train_step`, same model and batch, timed round robin; "
                  "speedup = fp32 / bf16 step within each round, median (min-max)):", ""]
        lines += _table(["model", "batch", "tokens", "compile", "fp32 step s", "bf16 step s", "bf16 speedup per round"],
                        body)
    sampling = [r for r in rows if r["kind"] == "sample"]
    if sampling:
        body = [[r["name"], r["batch_size"], steps, r["precision"], "yes" if r["compile"] else "no",
                 f"{row['none']['images_per_s']:.2f}", f"{row['uniform']['images_per_s']:.2f}",
                 f"{row['speedup']:.2f}x", f"{row['flop_bound']:.2f}x", f"{row['fraction_of_bound']:.2f}"]
                for r in sampling for steps, row in r["result"].items()]
        lines += [f"Euler sampling, CFG {sampling[0]['cfg_scale']} on every step (cond and uncond in one batched "
                  f"call); sharing = encoder recomputed every {sampling[0]['every']} steps:", ""]
        lines += _table(["model", "batch", "steps", "precision", "compile", "img/s", "img/s sharing", "speedup",
                         "FLOP bound", "of bound"], body)
    for r in (r for r in rows if r["kind"] == "eval"):
        res = r["result"]
        lines += [f"Evaluation (torch-fidelity Inception-v3, random weights; {r['num_samples']} samples of "
                  f"{r['size']} px against as many reference images):", ""]
        lines += _table(["feature extraction img/s", "FID+IS wall s (both sides extracted)",
                         "FID+IS wall s (reference features cached)"],
                        [[f"{res['feature_images_per_s']:.1f}", f"{res['fid_seconds_cold']:.1f}",
                          f"{res['fid_seconds_cached_reference']:.1f}"]])
    contention = [r for r in rows if r["kind"] == "contention"]
    if contention:
        body = [[r["name"], r["batch_size"], f"{r['result']['threads']} of {r['result']['cpus']}",
                 r["result"]["neighbour_threads"], f"{r['result']['alone_steps_per_s']:.2f}",
                 f"{r['result']['beside_steps_per_s']:.2f}", _rounds_cell(r["result"]["ratio_rounds"]),
                 f"{r['result']['load_average_1min']:.1f}"] for r in contention]
        lines += ["Training beside a second process (`Trainer.train_step`, threads sized by `ddt.threads`; the "
                  "neighbour trains the same model with its own threads, paused by SIGSTOP in the windows alone; "
                  "ratio = steps/s beside / alone within each round, median (min-max); a fair share of the "
                  "cores is 0.5):", ""]
        lines += _table(["model", "batch", "threads (of CPUs)", "neighbour threads", "alone steps/s",
                         "beside steps/s", "ratio per round", "load average (1 min, after)"], body)
    data = [r for r in rows if r["kind"] == "data"]
    if data:
        consumers = [(r["name"], r["result"]["images_per_s"]) for r in train
                     if r["model"]["in_channels"] == 4 and not r.get("activation_checkpointing")]
        body = [[r["workers"], r["batch_size"], f"{r['result']['images_per_s']:.0f}", name, f"{ips:.1f}",
                 f"{r['result']['images_per_s'] / ips:.0f}x"] for r in data for name, ips in consumers or [("-", None)]
                if ips] or [[r["workers"], r["batch_size"], f"{r['result']['images_per_s']:.0f}", "-", "-", "-"]
                            for r in data]
        lines += ["Latent cache reads (memory-mapped shards through the training DataLoader) against what the "
                  "training step consumes:", ""]
        lines += _table(["workers", "batch", "read img/s", "training step", "consumes img/s", "read / consumed"], body)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="cpu", choices=["smoke", "cpu", "threads", "official", "precision", "gpu"])
    parser.add_argument("--official", help="path of the official decoupled_improved_dit.py to run side by side")
    parser.add_argument("--device", help="default: cuda for the gpu suite, else cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=sorted(MEASURE), help="run only these rows and replace them in the "
                        "suite's existing results (the other rows are kept)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement (JSON parameters)
    args = parser.parse_args()
    device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if args.one:
        params = json.loads(args.one)
        print(json.dumps(MEASURE[params["kind"]](params, torch.device(device))))
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs a CUDA device; this machine has none (use --suite cpu)")
    if args.official and not Path(args.official).is_file():
        raise SystemExit(f"--official {args.official} is not a file: pass a copy of the official "
                         f"src/models/denoiser/decoupled_improved_dit.py")
    result = {"suite": args.suite, "device": device, "machine": machine(torch.device(device)),
              "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = suite(args.suite, args.official and str(Path(args.official).resolve()))
    if args.only:
        previous = args.out / f"run-{args.suite}.json"
        if not previous.is_file():
            raise SystemExit(f"--only {args.only}: {previous} does not exist; run the whole suite first")
        kept = json.loads(previous.read_text())
        result["rows"] = [r for r in kept["rows"] if r["kind"] != args.only]
        result["failed"] = [r for r in kept.get("failed", []) if r["kind"] != args.only] or None
        result = {k: v for k, v in result.items() if v is not None}
        result["command"] = f"{kept['command']}; then {result['command']}"
        rows = [r for r in rows if r["kind"] == args.only]
    for params in rows:
        start = time.perf_counter()
        try:
            result["rows"].append({**params, "result": run_one(params, device)})
        except RuntimeError as err:  # e.g. out of memory: recorded, the other rows still run
            result.setdefault("failed", []).append({**params, "error": str(err)[-2000:]})
        print(f"[{time.perf_counter() - start:6.1f} s] {params['kind']} {params.get('name', '')}", file=sys.stderr)
        markdown = report(result)
        for suffix, text in (("json", json.dumps(result, indent=1)), ("md", markdown + "\n")):
            path = args.out / f"run-{args.suite}.{suffix}"
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # rewritten after every row: an interrupted suite keeps what it measured
    print(markdown)


if __name__ == "__main__":
    main()
