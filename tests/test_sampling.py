"""Euler grid, classifier-free guidance interval and encoder reuse, with a recording stub network."""
import pytest
import torch

from ddt.sampling import sample, time_grid


def test_time_grid_matches_official_schedule():
    assert torch.allclose(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(time_grid(3, last_step=0.1), torch.tensor([0.0, 0.45, 0.9, 1.0]))
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(time_grid(4, timeshift=3.0), t / (t + (1 - t) * 3.0))
    assert torch.allclose(time_grid(1), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)


class Recorder(torch.nn.Module):
    """v = 1 for real labels, 0 for the null label; records every call."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y, s=None):
        self.calls.append({"t": t[0].item(), "labels": y.tolist(), "encoder": s is None})
        v = (y != self.num_classes).float().view(-1, 1, 1, 1).expand_as(x)
        return v, torch.zeros(len(x), 1, 1) if s is None else s


def test_cfg_only_inside_interval_strict():
    net = Recorder()
    noise, labels = torch.zeros(2, 1, 2, 2), torch.tensor([3, 4])
    x = sample(net, noise, labels, num_steps=4, cfg_scale=3.0, cfg_interval=(0.25, 0.8))
    guided = [10 in c["labels"] for c in net.calls]
    # Times 0, .25, .5, .75: strict bounds exclude t = 0 and t = 0.25.
    assert guided == [False, False, True, True]
    # v = 1 outside the interval, 0 + 3·(1 − 0) = 3 inside; each step is 0.25 long.
    assert torch.allclose(x, torch.full_like(x, 0.25 * (1 + 1 + 3 + 3)))
    assert all(len(c["labels"]) == (4 if g else 2) for c, g in zip(net.calls, guided))


def test_no_unconditional_pass_without_guidance():
    net = Recorder()
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=3)
    assert all(10 not in c["labels"] for c in net.calls)


def test_encoder_runs_only_at_recompute_steps():
    net = Recorder()
    sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=6, recompute_steps=[0, 3])
    assert [c["encoder"] for c in net.calls] == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="step 0"):
        sample(net, torch.zeros(1, 1, 2, 2), torch.tensor([0]), num_steps=2, recompute_steps=[1])


def test_sampling_a_real_model_is_deterministic():
    from ddt.models import DDT

    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=3, encoder_depth=2,
                num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    noise = torch.randn(3, 3, 8, 8)
    a = sample(model, noise, torch.tensor([0, 1, 2]), num_steps=5, cfg_scale=2.0, timeshift=2.0)
    b = sample(model, noise, torch.tensor([0, 1, 2]), num_steps=5, cfg_scale=2.0, timeshift=2.0)
    assert torch.equal(a, b) and a.shape == noise.shape and not torch.allclose(a, noise)
