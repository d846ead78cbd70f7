"""torch.distributed on CPU (gloo): 2 processes train exactly as 1 process on the same global batch."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddt import distributed
from ddt.data.order import batch_indices
from ddt.train import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEED = 8, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trainer(run_dir: Path, tiny_dinov2: str | None, compile: bool = False) -> Trainer:
    from test_repa import batch, repa_objective, tiny_model
    from ddt.data.pixels import ImageTensors

    images = batch(n=24)
    dataset = ImageTensors(images["images"], images["labels"])
    objective = repa_objective(tiny_dinov2) if tiny_dinov2 else None
    cfg = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1,
                      compile=compile)
    return Trainer(tiny_model(), dataset, cfg, run_dir=run_dir, seed=SEED, objective=objective, progress=False)


def _worker(rank: int, world_size: int, port: int, out: str, tiny_dinov2: str | None, compile: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    try:
        trainer = make_trainer(Path(out), tiny_dinov2, compile)
        rows = batch_indices(0, GLOBAL_BATCH, len(trainer.dataset), SEED, rank, world_size)
        loss, terms = trainer.forward_backward(trainer.dataset[rows])
        params = [*trainer.model.named_parameters(), *trainer.objective.named_parameters(prefix="objective")]
        first = {"loss": distributed.mean_over_ranks(loss), "rows": len(rows),
                 "compiled": trainer.model.blocks[0]._compiled_call_impl is not None,
                 "terms": {k: distributed.mean_over_ranks(v) for k, v in terms.items()},
                 "grads": {n: p.grad.clone() for n, p in params if p.grad is not None}}
        torch.save(first, Path(out) / f"step0_rank{rank}.pt")
        trainer.fit()
        distributed.barrier()  # rank 0 may still be writing the last checkpoint: leave the group together
    finally:
        distributed.teardown()


def train(tmp_path: Path, world_size: int, tiny_dinov2: str | None, compile: bool = False) -> Path:
    out = tmp_path / f"world{world_size}{'_compiled' if compile else ''}"
    out.mkdir()
    mp.spawn(_worker, args=(world_size, free_port(), str(out), tiny_dinov2, compile), nprocs=world_size)
    return out


@pytest.mark.parametrize("repa", [False, True], ids=["ddt", "ddt+repa"])
def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(tmp_path, tiny_dinov2, repa):
    weights = str(tiny_dinov2) if repa else None
    one, two = train(tmp_path, 1, weights), train(tmp_path, 2, weights)
    ref, a, b = (torch.load(p, weights_only=True) for p in
                 (one / "step0_rank0.pt", two / "step0_rank0.pt", two / "step0_rank1.pt"))
    assert (ref["rows"], a["rows"], b["rows"]) == (8, 4, 4)  # the global batch is split, not repeated
    torch.testing.assert_close(a["loss"], ref["loss"], rtol=1e-6, atol=1e-7)
    assert set(a["terms"]) == ({"fm_loss", "repa_loss"} if repa else {"fm_loss"})
    for k in a["terms"]:
        torch.testing.assert_close(a["terms"][k], ref["terms"][k], rtol=1e-6, atol=1e-7)
    assert set(a["grads"]) == set(ref["grads"]) and (not repa or any("projector" in n for n in a["grads"]))
    for name, grad in ref["grads"].items():  # DDP averaged the two halves into the full-batch gradient
        torch.testing.assert_close(a["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    # Four AdamW steps later the weights and EMA agree up to float round-off; rank 0 wrote last.pt.
    last_one = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    last_two = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert last_one["step"] == last_two["step"] == 4
    for part in ("model", "ema", "objective"):
        for k, v in last_one[part].items():
            torch.testing.assert_close(last_two[part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")


@pytest.mark.slow  # two ranks compile the blocks side by side on 2 cores (about a minute cold)
def test_two_gloo_ranks_with_compiled_blocks_match_one_eager_process(tmp_path):
    """train.compile=true under DistributedDataParallel: the averaged gradient and the trained weights."""
    one, two = train(tmp_path, 1, None), train(tmp_path, 2, None, compile=True)
    ref, a, b = (torch.load(p, weights_only=True) for p in
                 (one / "step0_rank0.pt", two / "step0_rank0.pt", two / "step0_rank1.pt"))
    assert a["compiled"] and b["compiled"] and not ref["compiled"]
    torch.testing.assert_close(a["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert set(a["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():  # compiled kernels: equal up to float round-off
        torch.testing.assert_close(a["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    last_one = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    last_two = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert last_one["step"] == last_two["step"] == 4
    for part in ("model", "ema"):  # names unchanged by the in-place compile
        assert set(last_two[part]) == set(last_one[part])
        for k, v in last_one[part].items():
            torch.testing.assert_close(last_two[part][k], v, rtol=1e-3, atol=1e-4, msg=f"{part}.{k}")


def _sample_worker(rank: int, world_size: int, port: int, out: str, solver: str) -> None:
    """Sample as the runner's sample stage does on each rank: its share of the images, into one folder."""
    from test_sampling import SPLIT_SAMPLING, split_sampler_kwargs, tiny_ddt
    from ddt.samples import generate_samples

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    try:
        rank, world_size = distributed.process_rank()
        generate_samples(tiny_ddt(), out, batch_size=3, rank=rank, world_size=world_size,
                         sampler_kwargs=split_sampler_kwargs(solver), **SPLIT_SAMPLING)
        distributed.barrier()
    finally:
        distributed.teardown()


@pytest.mark.parametrize("solver", ["sde", "heun"])
def test_two_gloo_ranks_sample_the_images_of_one_process(tmp_path, solver):
    """Image i is sampled on rank i mod 2 in other batches than alone; its initial and step noise stay its own."""
    from test_sampling import sampled_pngs

    folders = {n: tmp_path / f"world{n}" for n in (1, 2)}
    for world_size, folder in folders.items():
        mp.spawn(_sample_worker, args=(world_size, free_port(), str(folder), solver), nprocs=world_size)
    one, two = sampled_pngs(folders[1]), sampled_pngs(folders[2])
    assert len(one) == 10 and one == two


def test_batch_not_divisible_by_ranks_is_refused():
    from test_train import tiny_dataset, tiny_model

    os.environ.update(RANK="0", WORLD_SIZE="3")
    try:
        with pytest.raises(ValueError, match="train.batch_size=8 .* 3 processes"):
            Trainer(tiny_model(), tiny_dataset(), TrainConfig(max_steps=1, batch_size=8), run_dir="unused", seed=0)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_torchrun_two_ranks_end_to_end(tmp_path, cache_dir):
    """`torchrun --nproc-per-node 2 launch.py`: one run directory, written by rank 0, with 2-rank sampling
    for the curve point at step 2 and for the final evaluation."""
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), str(ROOT / "launch.py"),
           "train.max_steps=4", "train.batch_size=16", "train.ckpt_every=2", "eval.num_samples=20",
           "sampler.num_steps=4", "sampler.batch_size=10", "eval.every_steps=2", "progress=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["train"]["world_size"] == 2 and results["train"]["step"] == 4
    assert results["sample"]["world_size"] == 2 and len(list((run_dir / "samples").glob("*.png"))) == 20
    assert results["metrics"]["fid"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_2.pt"]
    assert [(p["step"], p["final"]) for p in results["curve"]] == [(2, False), (4, True)]
    assert len(list((run_dir / "curve" / "step_0000002" / "samples").glob("*.png"))) == 20
    assert results["curve"][0]["num_samples"] == 20 and results["curve"][0]["world_size"] == 2
