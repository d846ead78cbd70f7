"""Invalid settings and files stop `python launch.py` before any work: one line each, the key named, exit 2.

Table-driven over real command lines (subprocesses, no HYDRA_FULL_ERROR), plus interrupts, a sweep
with one bad point and strict JSON.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from ddt.ledger import read_json
from ddt.status import sweep_status, table

QUICK = ["train.max_steps=4", "train.batch_size=8", "train.ckpt_every=2", "eval.num_samples=20",
         "sampler.num_steps=2", "sampler.batch_size=20", "progress=false"]


def run_launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files the table's cases point at: a folder, a corrupt checkpoint, one of another model, a plain file."""
    root = tmp_path_factory.mktemp("files")
    (root / "folder").mkdir()
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    signature = {"arch": "ddt", "in_channels": 3, "patch_size": 4, "hidden_size": 32, "num_heads": 4, "depth": 28,
                 "encoder_depth": 22, "num_classes": 10, "norm": "rmsnorm", "ffn": "swiglu", "pos": "rope",
                 "qk_norm": True}
    torch.save({"model": {}, "ema": {}, "step": 1, "signature": signature}, root / "narrow.pt")
    wide = {**signature, "hidden_size": 64, "decoder_hidden_size": 128}  # the quickstart with a wide head
    torch.save({"model": {}, "ema": {}, "step": 1, "signature": wide}, root / "wide_head.pt")
    (root / "a_file").write_text("not a folder")
    return root


CASES = [  # (command-line overrides, what stderr must name)
    (["model.encoder_dept=8"], "did you mean model.encoder_depth?"),
    (["+model.encoder_dept=8"], "model.encoder_dept is not a config key; did you mean model.encoder_depth?"),
    (["model=ddt_q"], "model=ddt_q is not an option of the model group"),
    (["+experiment=nope"], "experiment=nope is not an option"),
    (["model.encoder_depth=abc"], "model.encoder_depth='abc' is not an integer"),
    (["model.encoder_depth=99"], "model.encoder_depth=99 is impossible for model.depth=28"),
    (["model.encoder_depth=0"], "model.encoder_depth=0"),
    (["model.num_heads=5"], "model.num_heads=5"),
    (["model.patch_size=3"], "model.patch_size=3"),
    (["resolution.latent_size=15"], "resolution.latent_size=15"),
    (["train.lr=-1"], "train.lr=-1 is out of range: it must be > 0"),
    (["train.ema_decay=1.5"], "train.ema_decay=1.5 is out of range"),
    (["train.label_dropout=1.0"], "train.label_dropout=1.0 is out of range"),
    (["train.max_steps=-5"], "train.max_steps=-5 is out of range"),
    (["train.batch_size=0"], "train.batch_size=0 is out of range"),
    (["train.precision=fp16"], "train.precision='fp16' is not one of auto, bf16, fp32"),
    (["train.betas=[0.9]"], "train.betas=[0.9] must be two numbers"),
    (["sampler.num_steps=0"], "sampler.num_steps=0 is out of range"),
    (["sampler.batch_size=0"], "sampler.batch_size=0 is out of range"),
    (["sampler.cfg_interval=[0.9,0.1]"], "sampler.cfg_interval=[0.9, 0.1] must be [low,high]"),
    (["sampler.timeshift=0"], "sampler.timeshift=0 is out of range"),
    (["sampler.sharing=every_other"], "sampler.sharing='every_other' is not one of none, uniform, dp"),
    (["sampler.sharing=dp"], "sampler.sharing=dp needs sampler.num_recompute between 1 and sampler.num_steps"),
    (["sampler.sharing=uniform", "sampler.num_recompute=17"], "sampler.num_recompute between 1 and"),
    (["sampler.solver=rk4"], "sampler.solver='rk4' is not one of euler, heun, sde"),
    (["eval.num_samples=0"], "eval.num_samples=0 is out of range"),
    (["eval.every_steps=-1"], "eval.every_steps=-1 is out of range"),
    (["eval=none", "eval.every_steps=100"], "eval=none computes no metrics"),
    (["stage=[train,finetune]"], "finetune"),
    (["device=gpu"], "device='gpu' is not a device"),
    # CPU-only test machines: torch's traceback from model.to("cuda") used to be all a user saw
    *([] if torch.cuda.is_available() else [(["device=cuda"], "device=cuda but this machine has no CUDA GPU"),
                                            (["device=cuda:3"], "device=cuda:3 but this machine has no CUDA GPU")]),
    (["seed=-1"], "seed=-1 is out of range"),
    (["logger.backend=tensorboard"], "logger.backend='tensorboard' is not one of none, wandb"),
    (["data=imagenet"], "data=imagenet is latent-space"),
    (["train.lr=-1", "train.ema_decay=1.5", "sampler.cfg_interval=[0.9,0.1]"],
     "train.lr=-1|train.ema_decay=1.5|sampler.cfg_interval"),  # all reported together
    (["eval.digits_classifier=v9"], "eval.digits_classifier=v9"),
    (["stage=evaluate", "ckpt={files}/folder"], "is a folder, not a checkpoint file"),
    (["stage=evaluate", "ckpt={files}/missing.pt"], "missing.pt does not exist"),
    (["stage=evaluate"], "no weights to sample from: no ckpt= was given"),
    (["stage=evaluate", "ckpt={files}/corrupt.pt"], "corrupt.pt is not a readable checkpoint"),
    (["stage=evaluate", "ckpt={files}/a_file"], "a_file is not a checkpoint (not a file torch.save wrote)"),
    (["stage=evaluate", "ckpt={files}/narrow.pt"], "model.hidden_size: checkpoint 32, config 64"),
    (["stage=evaluate", "ckpt={files}/wide_head.pt"], "model.decoder_hidden_size: checkpoint 128, config None"),
    (["model.decoder_hidden_size=100"], "model.decoder_hidden_size=100 / model.decoder_num_heads=4"),
    (["baseline=improved_sit", "model.decoder_hidden_size=96"], "model.decoder_hidden_size=96 sizes a DDT's decoder"),
    (["hydra.run.dir={files}/a_file/run"], "a_file is a file, not a folder"),
    (["resolution=r256", "repa=on", "data=imagenet", "data.root={files}/no_imagenet",
      "resolution.vae={files}/no_vae", "repa.target_weights={files}/no_dinov2.safetensors"],
     "no_imagenet|no_vae|no_dinov2"),  # a missing data folder, VAE and DINOv2 file in one go
    (["eval.fd_dinov2=true", "eval.dinov2_weights={files}/no_dinov2_vitl14.pth"],
     "no_dinov2_vitl14.pth does not exist. Download https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"),
    (["eval.fd_dinov2=true", "cache_dir={files}/empty_cache"],  # offline (HF_HUB_OFFLINE=1): nothing to download
     "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth|empty_cache/dinov2_vitl14_pretrain.pth"),
    (["resolution=r256", "data=imagenet", "data.root={files}/folder", "eval.fd_dinov2=true"],
     "eval.fd_dinov2=true needs DINOv2 statistics of the reference images, but the ADM reference batch"),
    (["repa=dispersive", "repa.layer=29"], "repa.layer=29 gives block 29 for the dispersive loss"),
    (["repa=dispersive", "repa.enabled=true"], "repa.dispersive=true and repa.enabled=true cannot be combined"),
]


@pytest.mark.parametrize("overrides,named", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_an_invalid_setting_or_file_stops_before_any_work_naming_it(overrides, named, files, tmp_path):
    run_dir = tmp_path / "run"
    args = [o.replace("{files}", str(files)) for o in overrides]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    start = time.perf_counter()
    proc = run_launch(*QUICK, *args)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    for part in named.split("|"):
        assert part in proc.stderr, (part, proc.stderr[-2000:])
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "samples").exists()
    if (run_dir / "results.json").exists():  # a failed status is all a stopped run leaves
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "failed" and named.split("|")[0] in results["error"]
        assert named.split("|")[0] in (run_dir / "launch.log").read_text()  # the console, also in the log
    print(f"{seconds:.1f} s: {' '.join(overrides)}")


def test_a_sweep_point_with_a_config_error_stops_the_sweep_before_any_point_trains(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_launch("-m", *QUICK, "model.encoder_depth=8,99", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "model.encoder_depth=99 is impossible" in proc.stderr
    assert not list(sweep.glob("*/results.json")) and not list(sweep.glob("*/checkpoints"))  # the good point waited


def start_training(args: list[str], run_dir) -> subprocess.Popen:
    """`python launch.py ARGS` in the background, returned once its training loop runs (on a busy machine too)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and "progress" not in read_json(run_dir / "ledger.json") and proc.poll() is None:
        time.sleep(0.1)  # the ledger's first progress is written as the training loop starts
    time.sleep(2)  # a few steps in
    return proc


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_says_how_to_resume_and_resumes(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    args = [*QUICK, "train.max_steps=400", "train.ckpt_every=1000", f"hydra.run.dir={run_dir}"]
    proc = start_training(args, run_dir)  # no checkpoint yet: ckpt_every is beyond the run
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], err[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    step = int(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"])
    assert results["status"] == "interrupted" and f"at step {step}" in results["interrupted"] and 0 < step < 400
    status = sweep_status(run_dir)  # the step of last.pt (not the last logged one) and what resumes it
    assert [(r["state"], r["step"]) for r in status["points"]] == [("interrupted", step)]
    assert (f"  interrupted run: {signal.Signals(signum).name} at step {step}; resumes from step {step} "
            f"(checkpoints/last.pt): run the same command again | log: ") in table(status)
    resumed = run_launch(*args, "train.max_steps=" + str(step + 2))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((run_dir / "results.json").read_text())
    assert again["status"] == "completed" and again["train"]["resumed_from_step"] == step


def test_results_json_is_strict_json_without_nan(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_launch(*QUICK, "train.max_steps=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    def no_constants(name):
        raise ValueError(f"{name} in results.json")
    results = json.loads((run_dir / "results.json").read_text(), parse_constant=no_constants)
    assert results["train"]["final_loss"] is None and results["train"]["final_loss_note"]


def test_a_file_that_is_not_a_checkpoint_is_named_as_such_and_kept(tmp_path):
    from ddt.checkpoint import load
    from ddt.errors import UsageError

    readme = tmp_path / "README.md"
    readme.write_text("# a user's file\n")
    with pytest.raises(UsageError, match="README.md is not a checkpoint") as err:
        load(readme)
    assert "delete" not in str(err.value) and readme.exists()
