"""Flow-matching loss, one optimisation step, checkpoints and exact resume."""
import pytest
import torch

from ddt.data.pixels import ImageTensors
from ddt.flow import flow_matching_loss, interpolate, sample_time
from ddt.models import DDT
from ddt.train import Trainer, TrainConfig


def tiny_model(encoder_depth=2):
    torch.manual_seed(0)
    return DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4,
               encoder_depth=encoder_depth, num_classes=10)


def tiny_dataset(n=40):
    g = torch.Generator().manual_seed(1)
    return ImageTensors(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g))


def test_interpolant_convention():
    x, noise = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    x_t, v = interpolate(x, noise, torch.tensor([0.0, 1.0]))
    assert x_t.flatten().tolist() == [0.0, 1.0]  # t = 0 is noise, t = 1 is data
    assert torch.equal(v, x - noise)
    t = sample_time(10_000, "lognorm", torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="time distribution"):
        sample_time(2, "cosine", torch.Generator(), torch.device("cpu"))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model()
    batch = tiny_dataset()[:16]
    x, y = batch["images"].float() / 127.5 - 1, batch["labels"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))

    def loss():
        return flow_matching_loss(model, x, y, generator=torch.Generator().manual_seed(0))

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def trainer(tmp_path, max_steps, model=None, **options):
    cfg = TrainConfig(max_steps=max_steps, batch_size=8, lr=1e-3, ema_decay=0.9, ckpt_every=2, log_every=1, **options)
    return Trainer(model or tiny_model(), tiny_dataset(), cfg, run_dir=tmp_path, seed=3, progress=False)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = trainer(tmp_path / "a", 6)
    straight.fit()
    first = trainer(tmp_path / "b", 3)  # stops at 3, between two checkpoint cadences
    first.fit()
    resumed = trainer(tmp_path / "b", 6, model=tiny_model())
    resumed.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert resumed.step == 3
    stats = resumed.fit()
    assert stats["resumed_from_step"] == 3 and stats["step"] == 6
    for name in ("model", "ema"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoint_round_trip_and_mismatch_message(tmp_path):
    t = trainer(tmp_path, 2)
    t.fit()
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and set(state) >= {"model", "ema", "optimizer", "generator", "signature"}
    other = trainer(tmp_path / "other", 2, model=tiny_model(encoder_depth=3))
    with pytest.raises(ValueError, match="model.encoder_depth: checkpoint 2, config 3"):
        other.load(path)


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    t = trainer(tmp_path, 6)
    t.cfg.max_steps = 2
    t.fit()
    t.cfg.max_steps = 6
    with torch.no_grad():
        t.model.final_layer.linear.bias.fill_(float("nan"))
    t.cfg.log_every = 10  # the non-finite loss is flagged on the device and caught at the step-4 checkpoint
    with pytest.raises(FloatingPointError, match="at step 2.*last.pt"):
        t.fit()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # nothing saved after


def test_activation_checkpointing_and_compile_keep_the_training_numbers(tmp_path):
    """Recomputed activations give the same gradients; compiled blocks the same to float round-off."""
    runs = {}
    for name, options in (("eager", {}), ("checkpointing", {"activation_checkpointing": True}),
                          ("compiled", {"compile": True})):
        t = trainer(tmp_path / name, 3, **options)
        stats = t.fit()
        runs[name] = (stats["final_loss"], t.model.state_dict())
    eager_loss, eager = runs["eager"]
    loss, state = runs["checkpointing"]
    assert loss == eager_loss and all(torch.equal(state[k], eager[k]) for k in eager)
    loss, state = runs["compiled"]
    assert set(state) == set(eager)  # compiled in place: checkpoints keep the parameter names
    assert abs(loss - eager_loss) < 1e-5 and all(torch.allclose(state[k], eager[k], atol=1e-5) for k in eager)


def test_precision_auto_takes_bf16_on_gpu_and_on_bf16_cpus_for_wide_models(monkeypatch):
    """auto: bf16 on CUDA; on CPU only with bf16 units and hidden_size >= CPU_BF16_MIN_WIDTH (narrower
    models train faster in fp32 there); bf16/fp32 are taken as given; anything else is refused."""
    import ddt.train as train
    from ddt.train import CPU_BF16_MIN_WIDTH, autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for units in (True, False):
        monkeypatch.setattr(train, "cpu_has_bf16_units", lambda units=units: units)
        assert autocast_dtype("auto", cpu, CPU_BF16_MIN_WIDTH) == (torch.bfloat16 if units else None)
        assert autocast_dtype("auto", cpu, CPU_BF16_MIN_WIDTH - 1) is None
        assert autocast_dtype("auto", cpu, None) is None
        assert autocast_dtype("auto", cuda, 64) == torch.bfloat16
        assert autocast_dtype("bf16", cpu, 64) == torch.bfloat16 and autocast_dtype("fp32", cuda, 1152) is None
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        autocast_dtype("fp16", cpu)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_records_the_precision_it_ran_in(tmp_path, precision):
    stats = trainer(tmp_path, 1, precision=precision).fit()
    assert stats["resolved_precision"] == precision and stats["final_loss"] is not None
    assert trainer(tmp_path / "auto", 1).fit()["resolved_precision"] == "fp32"  # auto at width 32: fp32 on any CPU


def test_a_resume_keeps_the_precision_auto_chose_for_the_run(tmp_path, monkeypatch):
    """precision=auto depends on the CPU: a run resumed on a CPU of the other kind trains on in what it began with."""
    import ddt.train as train

    monkeypatch.setattr(train, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(train, "CPU_BF16_MIN_WIDTH", 32)  # the tiny model (width 32) counts as wide
    first = trainer(tmp_path, 2)
    assert first.fit()["resolved_precision"] == "bf16"
    monkeypatch.setattr(train, "cpu_has_bf16_units", lambda: False)  # "another machine"
    resumed = trainer(tmp_path, 4)
    assert resumed.autocast is None  # what auto picks here, before the checkpoint is read
    resumed.load(tmp_path / "checkpoints" / "last.pt")
    assert resumed.autocast == torch.bfloat16 and resumed.fit()["resolved_precision"] == "bf16"
    explicit = trainer(tmp_path, 4, precision="fp32")  # an explicit setting is taken as given
    explicit.load(tmp_path / "checkpoints" / "last.pt")
    assert explicit.autocast is None
