"""Adams–Bashforth (solver=adams): weights, convergence order, decisions shared with Euler, the official loop."""
import math

import numpy as np
import pytest
import torch

from conftest import REFERENCE
from ddt.config import sampler_kwargs, validate
from ddt.models import DDT
from ddt.sampling import SamplingStats, adams_weights, sample, time_grid, uniform_recompute_steps
from test_sampling import GaussianFlow, Recorder


def test_weights_equal_the_closed_forms_on_a_uniform_grid():
    t = np.linspace(0.0, 1.0, 9)
    assert adams_weights(t, 2)[0] == [1.0]  # the first step has one velocity: Euler
    assert adams_weights(t, 2)[5] == pytest.approx([-1 / 2, 3 / 2], abs=1e-14)
    assert adams_weights(t, 3)[1] == pytest.approx([-1 / 2, 3 / 2], abs=1e-14)  # the lower-order start
    assert adams_weights(t, 3)[5] == pytest.approx([5 / 12, -16 / 12, 23 / 12], abs=1e-14)
    assert adams_weights(t, 4)[5] == pytest.approx([-9 / 24, 37 / 24, -59 / 24, 55 / 24], abs=1e-14)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_weights_integrate_polynomials_exactly_on_a_shifted_grid(order):
    t = time_grid(7, timeshift=3.0).double().numpy()
    for i, w in enumerate(adams_weights(t, order)):
        k = len(w)
        assert sum(w) == pytest.approx(1.0, abs=1e-14)
        nodes = t[i - k + 1:i + 1]
        for m in range(k):  # degree < k: the interpolant is the polynomial itself
            exact = (t[i + 1] ** (m + 1) - t[i] ** (m + 1)) / (m + 1) / (t[i + 1] - t[i])
            assert np.dot(w, nodes ** m) == pytest.approx(exact, abs=1e-12)


def test_order_and_solver_errors():
    with pytest.raises(ValueError, match="order=5"):
        sample(Recorder(), torch.zeros(1, 1, 1, 1), torch.tensor([0]), num_steps=3, solver="adams", order=5)
    with pytest.raises(ValueError, match="order=2 is the order of solver=adams"):
        sample(Recorder(), torch.zeros(1, 1, 1, 1), torch.tensor([0]), num_steps=3, solver="heun", order=2)


def random_ddt(seed=0):
    torch.manual_seed(seed)
    model = DDT(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=4, encoder_depth=3,
                num_classes=10).eval()
    for p in model.parameters():  # non-trivial weights everywhere (the default init zeroes the output)
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_order_one_is_euler_exactly():
    model, noise, labels = random_ddt(), torch.randn(3, 3, 8, 8), torch.tensor([1, 5, 9])
    kwargs = dict(num_steps=6, cfg_scale=2.5, cfg_interval=(0.3, 1.0), timeshift=2.0, recompute_steps=[0, 2, 4])
    assert torch.equal(sample(model, noise, labels, solver="adams", order=1, **kwargs),
                       sample(model, noise, labels, **kwargs))


@pytest.mark.parametrize("fresh", [False, True])
def test_guidance_and_sharing_decisions_are_eulers(fresh):
    calls = {}
    for solver in ("euler", "adams"):
        net, stats = Recorder(), SamplingStats()
        sample(net, torch.zeros(2, 1, 2, 2), torch.tensor([3, 4]), num_steps=6, solver=solver, cfg_scale=3.0,
               cfg_interval=(0.4, 0.9), recompute_steps=[0, 3], fresh_timestep=fresh, stats=stats,
               **({"order": 4} if solver == "adams" else {}))
        calls[solver] = (net.calls, net.encoder_calls, stats.encoder_passes, stats.decoder_passes)
    assert calls["adams"] == calls["euler"]


@pytest.mark.parametrize("solver,order,nfe", [("euler", None, 6), ("adams", 3, 6), ("sde", None, 6), ("heun", None, 11)])
def test_nfe_counts_a_guided_evaluation_once(solver, order, nfe):
    stats = SamplingStats()
    sample(Recorder(), torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=6, solver=solver, order=order,
           cfg_scale=2.0, cfg_interval=(0.4, 1.0), stats=stats)
    assert stats.evaluations == 2 * nfe  # summed over 2 images
    assert stats.decoder_passes > stats.evaluations  # the guided ones passed 2 rows per image


class QuarticRate(torch.nn.Module):
    """dx/dt = t⁴·x, so x(1) = e^{1/5}·x(0): smooth, and flat at t = 0, so the lower-order start of the
    multistep solver (Euler, then AB2, ...) errs by O(h^{p+1}) and the method's own order shows."""

    num_classes = 1
    decoupled = True

    def encoder_output(self, x, t, y):
        return torch.zeros(len(x), 1, 1)

    def self_condition(self, h, t):
        return h

    def forward(self, x, t, y, s=None):
        return t.view(-1, *[1] * (x.dim() - 1)).double() ** 4 * x, s


CONVERGENCE_STEPS = (32, 64, 128, 256)


def global_errors(model, exact, noise, order, steps=CONVERGENCE_STEPS):
    labels = torch.zeros(len(noise), dtype=torch.long)
    return [(sample(model, noise, labels, num_steps=n, solver="adams", order=order) - exact).abs().max().item()
            for n in steps]


def fitted_slope(errors, steps=CONVERGENCE_STEPS) -> float:
    """−d log(error) / d log(N): the global order of convergence."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_global_error_falls_at_slope_order(order):
    noise = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    slope = fitted_slope(global_errors(QuarticRate(), noise * math.exp(0.2), noise, order))
    print(f"adams order {order}: slope {slope:.3f} over N = {CONVERGENCE_STEPS}")
    assert slope == pytest.approx(order, abs=0.25)


def test_the_lower_order_start_limits_orders_3_and_4_to_2_where_the_field_curves_at_t0():
    # The official start (step i uses min(order, i + 1) velocities) makes step 0 an Euler step with an
    # O(h²) error, which stays in the result: on the Gaussian flow (x'' ≠ 0 at t = 0) order 4 converges at 2.
    model = GaussianFlow()
    noise = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = global_errors(model, model.mu + model.sigma * noise, noise, 4, steps=(64, 128, 256))
    assert fitted_slope(errors, (64, 128, 256)) == pytest.approx(2.0, abs=0.2)


def lagrange_mean_weights_float32(ts: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> list[torch.Tensor]:
    """The official pre_integral computation: each Lagrange basis integrated by its antiderivative in
    the grid's float32, then divided by the weights' sum."""
    ints = []
    for j in range(len(ts)):
        others = [ts[m] for m in range(len(ts)) if m != j]
        coeffs = torch.ones(1, dtype=ts.dtype)  # polynomial Π (t − t_m), highest power first
        for tm in others:
            coeffs = torch.cat([coeffs, torch.zeros(1)]) - torch.cat([torch.zeros(1), coeffs * tm])
        denom = torch.prod(torch.stack([ts[j] - tm for tm in others])) if others else torch.tensor(1.0)
        powers = torch.arange(len(coeffs), 0, -1, dtype=ts.dtype)  # antiderivative: c·t^{n+1}/(n+1)
        anti = lambda t: (coeffs / powers * t ** powers).sum()  # noqa: E731
        ints.append((anti(end) - anti(start)) / denom)
    total = sum(ints)
    return [i / total for i in ints]


def official_adams(net, noise, labels, num_steps, order, cfg, interval, timeshift, last_step, refresh_rate):
    """The official AdamLMSampler loop (adam_sampling.py, with last_step set), with the stateful
    EulerSampler's encoder refresh: float32 grid and weights, t accumulated by t += dt."""
    last_step = 1.0 / num_steps if last_step is None else last_step
    timesteps = torch.cat([torch.linspace(0.0, 1 - last_step, num_steps), torch.tensor([1.0])])
    timesteps = timesteps / (timesteps + (1 - timesteps) * timeshift)
    deltas = timesteps[1:] - timesteps[:-1]
    coeffs = []
    for i in range(num_steps):
        k = min(order, i + 1)
        coeffs.append(lagrange_mean_weights_float32(timesteps[i - k + 1:i + 1], timesteps[i], timesteps[i + 1]))
    condition = torch.cat([torch.full_like(labels, net.num_classes), labels])
    x, state, trajectory = noise, None, []
    t_cur = torch.zeros(len(noise))
    for i in range(num_steps):
        if i % refresh_rate == 0:
            state = None
        out, state = net(torch.cat([x, x]), t_cur.repeat(2), condition, state)
        uncond, cond = out.chunk(2)
        w = cfg if interval[0] < t_cur[0] < interval[1] else 1.0
        trajectory.append(uncond + w * (cond - uncond))
        v = torch.zeros_like(x)
        for c, past in zip(coeffs[i], trajectory[-len(coeffs[i]):]):
            v += c * past
        x = x + v * deltas[i]
        t_cur += deltas[i]
    return x


OFFICIAL_CASES = {  # order, num_steps, cfg, interval, timeshift, last_step, refresh_rate
    "o2": (2, 7, 1.0, (0.0, 1.0), 1.0, None, 1),
    "o3-shift2-cfg": (3, 8, 3.0, (0.0, 1.0), 2.0, None, 1),
    "o4-shift3-interval": (4, 6, 2.5, (0.3, 0.9), 3.0, None, 1),
    "o2-refresh3-interval": (2, 9, 2.0, (0.2, 1.0), 2.0, None, 3),
    "o4-refresh2-last-step": (4, 10, 4.0, (0.1, 0.8), 1.5, 0.04, 2),
}


@pytest.fixture(scope="module")
def official_tiny():
    ref = torch.load(REFERENCE / "ddt_official_tiny.pt", weights_only=True)
    return DDT.from_official(ref["config"], ref["state_dict"]).eval(), ref


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_reproduces_the_official_sampler(official_tiny, case):
    model, ref = official_tiny
    order, n, cfg, interval, shift, last_step, rate = OFFICIAL_CASES[case]
    noise = torch.randn(ref["x"].shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4, 7])
    with torch.no_grad():
        ours = sample(model, noise, labels, num_steps=n, solver="adams", order=order, cfg_scale=cfg,
                      cfg_interval=interval, timeshift=shift, last_step=last_step,
                      recompute_steps=uniform_recompute_steps(n, math.ceil(n / rate)))
        official = official_adams(model, noise, labels, n, order, cfg, interval, shift, last_step, rate)
    error = (ours - official).abs().max().item()
    print(f"{case}: max abs error {error:.2e} (|x| up to {official.abs().max().item():.2f})")
    assert error < 1e-5


def test_compiled_blocks_sample_what_eager_blocks_sample():
    from ddt.models import compile_model

    torch.manual_seed(1)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4, encoder_depth=3, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # as test_sampling's compile test
    noise, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    kwargs = dict(num_steps=5, solver="adams", order=3, cfg_scale=2.0, cfg_interval=(0.2, 0.9), recompute_steps=[0, 3])
    eager = sample(model, noise, labels, **kwargs)
    compiled = sample(compile_model(model), noise, labels, **kwargs)
    compile_model(model, enabled=False)
    assert (compiled - eager).abs().max() < 1e-5


def test_few_step_study_composes_at_every_point(compose):
    from test_experiments import sweep_points

    points = sweep_points("few_step")
    assert len(points) == 5 * 7 * 3
    seen = set()
    for point in points:
        plain = validate(compose("+experiment=few_step", *point, "ckpt=/weights/model.ckpt"))
        kwargs = sampler_kwargs(plain)
        assert plain["stage"] == ["sample", "evaluate"] and plain["paper"]["2.0"][5] == 5.57
        assert ("order" in kwargs) == (kwargs["solver"] == "adams")  # Euler and Heun have no order to pass
        seen.add((kwargs["solver"], kwargs.get("order"), kwargs["num_steps"], kwargs["timeshift"]))
    assert len(seen) == len(points)  # every point a distinct sampler setting
    assert {(s, o) for s, o, _, _ in seen} == {("euler", None), ("heun", None), ("adams", 2), ("adams", 3), ("adams", 4)}


def test_adams_config_defaults_to_order_2(compose):
    plain = validate(compose("sampler=adams"))
    assert sampler_kwargs(plain)["order"] == 2 and plain["sampler"]["solver"] == "adams"
    assert "order" not in sampler_kwargs(validate(compose("sampler=heun")))


@pytest.mark.parametrize("solver,nfe", [("adams", 3), ("heun", 5)])
def test_generate_samples_records_nfe_per_image(tmp_path, solver, nfe):
    from ddt.samples import generate_samples
    from ddt.models import build_model

    torch.manual_seed(0)
    model = build_model(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=2, encoder_depth=1,
                        num_classes=10).eval()
    stats = generate_samples(model, tmp_path, num_samples=4, batch_size=4, seed=0, latent_shape=(3, 16, 16),
                             progress=False, sampler_kwargs={"num_steps": 3, "solver": solver, "cfg_scale": 2.0})
    assert stats["nfe_per_image"] == nfe  # a guided evaluation passes 2 rows per image but counts once
    assert stats["decoder_passes_per_image"] == 2 * nfe - 1  # t = 0 lies outside the open interval (0, 1)
