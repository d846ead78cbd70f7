"""The prediction target (`prediction=v|x|eps`): the network's output read as velocity, clean image or noise,
always turned into a velocity, so training and every sampler see velocities (JiT, arXiv 2511.13720)."""
import json

import pytest
import torch

from conftest import launch
from ddt.config import build_network, config_id, validate
from ddt.models import build_model
from ddt.models.ddt import PREDICTIONS
from ddt.sampling import sample

TINY = dict(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=4, encoder_depth=2, num_classes=10)


def by_hand(prediction: str, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity on x_t = t·x + (1 − t)·ε in float64: v = (x̂ − x_t)/(1 − t), (x_t − ε̂)/t, divisors >= 0.05."""
    out, x_t, t = out.double(), x_t.double(), t.double().view(-1, 1, 1, 1)
    if prediction == "x":
        return (out - x_t) / torch.maximum(1 - t, torch.tensor(0.05, dtype=torch.float64))
    if prediction == "eps":
        return (x_t - out) / torch.maximum(t, torch.tensor(0.05, dtype=torch.float64))
    return out


def test_the_true_image_or_noise_gives_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)  # no divisor below the clip
    x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    for prediction, truth in (("v", x - eps), ("x", x), ("eps", eps)):
        torch.testing.assert_close(PREDICTIONS[prediction].velocity(truth, x_t, t), x - eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_the_divisor_is_clipped_where_jit_clips_it(prediction):
    g = torch.Generator().manual_seed(1)
    out, x_t = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0])  # noise, midway, data: each end divides by 0.05 for one of the two
    torch.testing.assert_close(PREDICTIONS[prediction].velocity(out, x_t, t).double(), by_hand(prediction, out, x_t, t),
                               rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_the_network_returns_the_velocity_of_its_output(prediction):
    torch.manual_seed(0)
    raw = build_model(**TINY)  # prediction=v: forward returns the last layer's output unchanged
    torch.manual_seed(0)
    model = build_model(**TINY, prediction=prediction)
    for p in raw.final_layer.parameters():  # the zero-initialised output layer would hide the conversion
        torch.nn.init.normal_(p, std=0.1)
    model.load_state_dict(raw.state_dict())
    g = torch.Generator().manual_seed(2)
    x_t, t, y = torch.randn(5, 3, 8, 8, generator=g), torch.rand(5, generator=g), torch.arange(5)
    with torch.no_grad():
        out, s_raw = raw(x_t, t, y)
        v, s = model(x_t, t, y)
    torch.testing.assert_close(v.double(), by_hand(prediction, out, x_t, t), rtol=1.3e-6, atol=1e-5)  # float32 round-off
    assert torch.equal(s, s_raw)  # the encoder's self-condition does not depend on the reading


@pytest.mark.parametrize("solver,extra", [("euler", {}), ("heun", {}), ("sde", {"sde_diffusion": 0.5}),
                                          ("adams", {"order": 3})])
@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_every_sampler_integrates_the_converted_velocity(solver, extra, prediction):
    """With guidance and encoder sharing, sampling an x/eps network equals sampling its raw output converted by hand."""
    torch.manual_seed(0)
    model = build_model(**TINY, prediction=prediction)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    hand = build_model(**TINY)
    hand.load_state_dict(model.state_dict())
    raw_forward = hand.forward

    def forward(x, t, y, s=None):
        out, s = raw_forward(x, t, y, s)
        return by_hand(prediction, out, x, t).float(), s

    hand.forward = forward
    noise, labels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    kwargs = dict(num_steps=6, solver=solver, cfg_scale=2.0, cfg_interval=(0.1, 1.0), recompute_steps=[0, 2, 4], **extra)
    with torch.no_grad():
        got = sample(model.eval(), noise, labels, generator=torch.Generator().manual_seed(4), **kwargs)
        want = sample(hand.eval(), noise, labels, generator=torch.Generator().manual_seed(4), **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_key_reaches_the_network_the_checkpoint_and_config_id(compose):
    v, x = validate(compose()), validate(compose("prediction=x"))
    assert build_network(x).prediction == "x" and build_network(x).config["prediction"] == "x"
    assert config_id(validate(compose("prediction=v"))) == config_id(v)  # runs made before the key keep their id
    assert config_id(x) != config_id(v) != config_id(validate(compose("prediction=eps")))
    assert build_network(x).config_mismatch(build_network(v).config) == ["model.prediction: checkpoint v, config x"]
    with pytest.raises(ValueError, match="prediction='z' is not one of v, x, eps"):
        validate(compose("prediction=z"))


def test_an_x_prediction_run_trains_samples_and_scores(tmp_path):
    launch("prediction=x", "model.depth=4", "model.encoder_depth=2", "model.hidden_size=32", "model.num_heads=2",
           "train.max_steps=4", "train.batch_size=16", "eval.num_samples=20", "sampler.num_steps=4",
           "sampler.batch_size=20", "progress=false", f"hydra.run.dir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["prediction"] == "x"
    assert results["model"]["prediction"] == "x" and results["metrics"]["fid"] > 0
