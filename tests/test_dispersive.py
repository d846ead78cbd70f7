"""The dispersive loss (Wang & He, arXiv 2506.09027): the formula, its gradient, 2 gloo ranks, training, config."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT
from ddt import distributed
from ddt.config import validate
from ddt.data.order import batch_indices
from ddt.data.pixels import ImageTensors
from ddt.errors import UsageError
from ddt.flow import dispersive_loss
from ddt.models import build_model
from ddt.objective import DispersiveLoss, Objective
from ddt.train import Trainer, TrainConfig
from test_distributed import GLOBAL_BATCH, SEED, free_port
from test_repa import batch, tiny_model


def by_hand(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the mean over every (i, j), i = j included, of exp(-|z_i - z_j|^2 / (D tau)), as a plain loop."""
    flat = z.reshape(len(z), -1)
    total = 0.0
    for i in range(len(flat)):
        for j in range(len(flat)):
            total += math.exp(-((flat[i] - flat[j]) ** 2).sum().item() / (flat.shape[1] * temperature))
    return torch.tensor(math.log(total / len(flat) ** 2), dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_dispersive_loss_is_the_formula_of_the_release(temperature):
    z = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(dispersive_loss(z, temperature), by_hand(z, temperature), rtol=1e-12, atol=1e-12)
    # the authors' PyTorch release (tau = 1): pdist^2 / D twice, B zeros, log of the mean of exp(-diff)
    diff = torch.nn.functional.pdist(z.flatten(1)).pow(2) / z[0].numel()
    release = torch.log(torch.exp(-torch.cat([diff, diff, torch.zeros(len(z), dtype=z.dtype)])).mean())
    torch.testing.assert_close(dispersive_loss(z, 1.0), release, rtol=1e-12, atol=1e-12)
    # identical samples: every pair is at distance 0, the maximum log 1 = 0; apart: negative
    assert dispersive_loss(z[:1].expand(4, 5, 3), temperature).item() == pytest.approx(0.0, abs=1e-12)
    assert dispersive_loss(z, temperature) < 0


def test_dispersive_loss_gradient_and_precision():
    z = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dispersive_loss(x, 0.5), (z,))
    twins = torch.cat([z, z[:1]]).detach().requires_grad_()  # a zero distance off the diagonal: finite gradient
    dispersive_loss(twins, 0.5).backward()
    assert torch.isfinite(twins.grad).all()
    low = z.detach().to(torch.bfloat16)
    assert dispersive_loss(low, 0.5).dtype == torch.float32  # bf16 hidden states, float32 loss
    torch.testing.assert_close(dispersive_loss(low, 0.5), by_hand(low.double(), 0.5).float(), rtol=1e-5, atol=1e-6)


def dispersive_trainer(run_dir: Path, max_steps: int = 4, batch_size: int = GLOBAL_BATCH, arch: str = "ddt") -> Trainer:
    """The tiny 4-block model with the dispersive loss on block 2, on 24 random images."""
    images = batch(n=24)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1)
    model = tiny_model() if arch == "ddt" else sit_model()
    objective = Objective(dispersive=DispersiveLoss(layer=2, temperature=0.5, weight=0.5))
    return Trainer(model, ImageTensors(images["images"], images["labels"]), cfg, run_dir=run_dir, seed=SEED,
                   objective=objective, progress=False)


def sit_model():
    torch.manual_seed(0)
    return build_model("sit", in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4, num_classes=10)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    try:
        # the function alone: this rank's rows rank::world_size of one global z
        z = torch.randn(GLOBAL_BATCH, 3, 4, generator=torch.Generator().manual_seed(5))[rank::world_size]
        z.requires_grad_()
        loss = dispersive_loss(z, 0.5, shard=(rank, world_size))
        (loss / world_size).backward()  # the mean over ranks, as DistributedDataParallel averages
        # a training step of the model with the loss on block 2, then four AdamW steps
        trainer = dispersive_trainer(Path(out))
        rows = batch_indices(0, GLOBAL_BATCH, len(trainer.dataset), SEED, rank, world_size)
        total, terms = trainer.forward_backward(trainer.dataset[rows])
        torch.save({"z_loss": loss.detach(), "z_grad": z.grad, "loss": distributed.mean_over_ranks(total),
                    "terms": {k: distributed.mean_over_ranks(v) for k, v in terms.items()},
                    "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}},
                   Path(out) / f"step0_rank{rank}.pt")
        trainer.fit()
        distributed.barrier()
    finally:
        distributed.teardown()


def spawn(tmp_path: Path, world_size: int) -> Path:
    out = tmp_path / f"world{world_size}"
    out.mkdir()
    mp.spawn(_worker, args=(world_size, free_port(), str(out)), nprocs=world_size)
    return out


def max_abs(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_gloo_ranks_give_the_loss_and_gradients_of_one_process(tmp_path):
    one, two = spawn(tmp_path, 1), spawn(tmp_path, 2)
    ref, a, b = (torch.load(p, weights_only=True) for p in
                 (one / "step0_rank0.pt", two / "step0_rank0.pt", two / "step0_rank1.pt"))
    # the function: the global loss on every rank, each rank's rows get the global gradient
    torch.testing.assert_close(a["z_loss"], ref["z_loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b["z_loss"], ref["z_loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a["z_grad"], ref["z_grad"][0::2], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b["z_grad"], ref["z_grad"][1::2], rtol=1e-5, atol=1e-8)
    # the model under DistributedDataParallel: loss terms and averaged gradients of the whole global batch
    assert set(a["terms"]) == {"fm_loss", "dispersive_loss"}
    for k in ("loss", "terms"):
        torch.testing.assert_close(a[k], ref[k], rtol=1e-6, atol=1e-7)
    assert set(a["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(a["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    last_one, last_two = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (one, two))
    assert last_one["step"] == last_two["step"] == 4
    for part in ("model", "ema"):
        torch.testing.assert_close(last_two[part], last_one[part], rtol=1e-4, atol=1e-5)
    z_grads = {"0": torch.cat([a["z_grad"], b["z_grad"]]), "1": torch.cat([ref["z_grad"][0::2], ref["z_grad"][1::2]])}
    print(f"2 ranks vs 1: |loss| {abs(a['z_loss'] - ref['z_loss']).item():.2e}, |z grad| "
          f"{(z_grads['0'] - z_grads['1']).abs().max().item():.2e}; model: |dispersive_loss| "
          f"{abs(a['terms']['dispersive_loss'] - ref['terms']['dispersive_loss']).item():.2e}, "
          f"|grad| {max_abs(a['grads'], ref['grads']):.2e}, |weights after 4 steps| "
          f"{max_abs(last_two['model'], last_one['model']):.2e}")


@pytest.mark.parametrize("arch", ["ddt", "sit"])
def test_training_steps_with_the_dispersive_term_lower_it_on_a_fixed_batch(arch, tmp_path):
    fixed = batch()
    losses = {}
    for weight in (0.0, 0.5):  # the same steps without and with the dispersive term in the total loss
        model = tiny_model() if arch == "ddt" else sit_model()
        objective = Objective(dispersive=DispersiveLoss(layer=2, temperature=0.5, weight=weight))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        history = []
        for _ in range(6):
            loss, terms = objective(model, fixed, torch.Generator().manual_seed(0))
            history.append(terms["dispersive_loss"].item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert set(terms) == {"fm_loss", "dispersive_loss"}
        torch.testing.assert_close(loss, terms["fm_loss"] + weight * terms["dispersive_loss"])
        losses[weight] = history
    assert losses[0.0][0] == losses[0.5][0]  # same start
    assert losses[0.5][-1] < losses[0.5][0]  # the term goes down...
    assert losses[0.5][-1] < losses[0.0][-1]  # ...because of its own gradient, not flow matching's


def test_dispersive_training_resumes_exactly(tmp_path):
    straight = dispersive_trainer(tmp_path / "a", batch_size=4)
    stats = straight.fit()
    assert stats["final_dispersive_loss"] < 0 and "final_fm_loss" in stats
    dispersive_trainer(tmp_path / "b", max_steps=2, batch_size=4).fit()
    resumed = dispersive_trainer(tmp_path / "b", batch_size=4)
    resumed.load(tmp_path / "b" / "checkpoints" / "last.pt")
    resumed_stats = resumed.fit()
    assert resumed_stats["final_dispersive_loss"] == stats["final_dispersive_loss"]
    for part in ("model", "ema"):
        a, b = getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert straight.state_dict()["objective"] == {}  # nothing trainable besides the model


def test_repa_dispersive_composes_and_builds_the_loss(compose):
    from ddt.components import build_objective

    plain = validate(compose("repa=dispersive"))
    assert plain["repa"] == {"enabled": False, "dispersive": True, "temperature": 0.5, "weight": 0.5, "layer": None}
    objective = build_objective(plain, None, None)
    assert objective.repa is None and objective.dispersive == DispersiveLoss(layer=7, temperature=0.5, weight=0.5)
    sit = validate(compose("baseline=improved_sit", "repa=dispersive", "repa.layer=3", "repa.temperature=1"))
    assert sit["model"]["arch"] == "sit" and build_objective(sit, None, None).dispersive.layer == 3
    b = validate(compose("+experiment=dispersive", "repa=dispersive", "data.root=/d"))
    assert b["model"]["depth"] == 12 and build_objective(b, None, None).dispersive.layer == 3


def test_repa_on_and_off_are_unchanged(compose):
    """No new keys in repa=on/off, so their config_id (the seeds' group of existing results) stays."""
    off, on = validate(compose("repa=off")), validate(compose("repa=on"))
    assert off["repa"] == {"enabled": False}
    assert set(on["repa"]) == {"enabled", "target_encoder", "target_weights", "target_kwargs", "align_layer",
                               "projector_dim", "weight"}


@pytest.mark.parametrize("overrides,named", [
    (["repa.temperature=0"], "repa.temperature=0 is out of range: it must be > 0"),
    (["repa.layer=29"], "repa.layer=29 gives block 29 for the dispersive loss; it must be a block index between 1"),
    (["model=ddt_s", "model.depth=3", "model.encoder_depth=2"], "repa.layer=null gives block 0"),
    (["repa.enabled=true"], "repa.dispersive=true and repa.enabled=true cannot be combined"),
    (["repa.weight=null"], "repa.dispersive=true needs repa.weight; select repa=dispersive"),
])
def test_invalid_dispersive_settings_name_the_key(compose, overrides, named):
    with pytest.raises(UsageError, match=named.replace("(", r"\(").replace(")", r"\)")):
        validate(compose("repa=dispersive", *overrides))


def test_the_overhead_benchmark_runs(tmp_path):
    """benchmarks/dispersive.py on a tiny model (the numbers are the docs', not asserted)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dispersive", "--steps", "2", "--depth", "4",
                           "--encoder-depth", "3", "--width", "32", "--heads", "2", "--batch", "8",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "dispersive.json").read_text())
    assert set(result["median_step_s"]) == {"none", "dispersive", "loss alone"}
    assert result["features_per_sample"] == 16 * 32 and "Overhead" in (tmp_path / "dispersive.md").read_text()
