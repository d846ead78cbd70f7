"""Invalid settings and files stop `python launch.py` before any work: one line each, the key named, exit 2.

Table-driven over real command lines (subprocesses, no HYDRA_FULL_ERROR), plus interrupts, a sweep
with one bad point and strict JSON.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
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
    assert not run_dir.exists()  # a refusal writes nothing: no folder, .hydra, results.json or ledger
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


ANSWER = "stopping after this step; Ctrl-C again to stop now"


def test_ctrl_c_is_answered_within_a_second_even_inside_one_long_torch_call(tmp_path, caplog):
    """The answer comes from a thread the signal wakes; the main thread, held by one torch call (as by a slow
    backward), stops after the step, or at once at a second Ctrl-C."""
    from test_train import trainer

    from ddt.errors import Interrupted
    from ddt.signals import stop_after_step_on_interrupt

    t = trainer(tmp_path, 4)
    n = 1024
    a = torch.randn(n, n)
    a @ a  # warm-up
    start = time.perf_counter()
    a @ a
    n = min(8000, int(n * (4.0 / (time.perf_counter() - start)) ** (1 / 3)))  # one product of about 4 s here
    a = torch.randn(n, n)
    sent = []
    with caplog.at_level(logging.WARNING, logger="ddt.runner"), pytest.raises(Interrupted) as stopped:
        with stop_after_step_on_interrupt(t):
            threading.Timer(0.3, lambda: (sent.append(time.time()), os.kill(os.getpid(), signal.SIGINT))).start()
            a @ a  # no Python bytecode runs in the main thread until it returns
            returned = time.time()
            (answer,) = [r for r in caplog.records if ANSWER in r.getMessage()]
            assert answer.getMessage() == f"SIGINT at step 0: {ANSWER}"
            assert returned - sent[0] > 1.0, "the product was too short to hold the main thread"
            assert answer.created - sent[0] < 1.0 and answer.created < returned
            assert t.interrupt is not None  # the first Ctrl-C: stop after this step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the second: ended at once by Interrupted
    assert str(stopped.value) == "SIGINT again: stopped at once at step 0" and stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's handler is back


def test_a_second_ctrl_c_stops_a_run_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    """Two Ctrl-C in a step of several seconds, as a user would: the answer within a second, exit 130 before the
    step ends, last.pt (written every step) the one before it, whole, and no temp file left."""
    run_dir = tmp_path / "run"
    args = [*QUICK, "train.max_steps=400", "train.batch_size=1024", "train.ckpt_every=1", f"hydra.run.dir={run_dir}"]
    proc = start_training(args, run_dir)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stderr), daemon=True)
    reader.start()
    saved = read_json(run_dir / "ledger.json").get("checkpoint", {}).get("step")
    deadline = time.time() + 300
    while read_json(run_dir / "ledger.json").get("checkpoint", {}).get("step") == saved and time.time() < deadline:
        time.sleep(0.01)  # a step has just ended: the next one has seconds to go
    saved = read_json(run_dir / "ledger.json")["checkpoint"]["step"]
    time.sleep(0.1)
    first = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    reader.join(timeout=10)
    answers = [when for when, line in lines if ANSWER in line]
    assert len(answers) == 1 and answers[0] - first < 1.0, "".join(line for _, line in lines)[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["interrupted"].startswith("SIGINT again: stopped at once")
    assert int(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]) == saved
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]
    assert not any("Traceback" in line for _, line in lines)


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
